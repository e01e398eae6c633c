"""Fixtures for the chart tier: a pinned helm binary and rendered manifests.

helm comes from $STOWAGE_HELM, or from tests/tools/install-helm.sh (go install, cached); these
tests never skip for want of it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from . import util


@pytest.fixture(scope="session")
def helm() -> str:
    path = os.environ.get("STOWAGE_HELM")
    if not path:
        out = subprocess.run(
            [str(util.REPO / "tests" / "tools" / "install-helm.sh")],
            check=True,
            capture_output=True,
            text=True,
            timeout=1800,
        ).stdout
        path = out.strip().splitlines()[-1]
    assert Path(path).is_file() and os.access(path, os.X_OK), f"helm not executable: {path}"
    version = subprocess.run(
        [path, "version", "--short"], check=True, capture_output=True, text=True
    ).stdout
    assert version.startswith("v3."), version
    return path


@pytest.fixture(scope="session")
def render(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[dict]]:
    """render(values_dict) -> list of manifests (cached per value set)."""
    cache: dict[str, list[dict]] = {}
    tmp = tmp_path_factory.mktemp("values")

    def _render(values: dict | None = None, namespace: str = "stowage-system") -> list[dict]:
        key = util.canonical(values or {}) + namespace
        if key not in cache:
            cache[key] = util.helm_template(helm, values or {}, tmp, namespace=namespace)
        return cache[key]

    return _render
