"""deploy/Dockerfile, checked by parsing it (no container engine or hadolint here)."""

from __future__ import annotations

import re
import shlex
import tomllib

from . import util

DOCKERFILE = util.REPO / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def stages() -> list[tuple[str, list[tuple[str, str]]]]:
    result: list[tuple[str, list[tuple[str, str]]]] = []
    for ins, args in instructions():
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            result.append((m.group(2), []))
        elif result:
            result[-1][1].append((ins, args))
    return result


def test_known_instructions_only() -> None:
    known = {
        "FROM",
        "ARG",
        "ENV",
        "WORKDIR",
        "COPY",
        "RUN",
        "LABEL",
        "USER",
        "ENTRYPOINT",
        "CMD",
        "EXPOSE",
    }
    seen = [i for i, _ in instructions()]
    assert set(seen) <= known, set(seen) - known
    assert "ADD" not in seen and "MAINTAINER" not in seen


def test_multi_stage_slim_python_311() -> None:
    ins = instructions()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    names = [n for n, _ in stages()]
    assert names == ["build", "runtime"]


def test_build_stage_builds_the_wheel_from_the_source_tree() -> None:
    build = dict(stages())["build"]
    copies = [a for i, a in build if i == "COPY"]
    sources = [s for c in copies for s in shlex.split(c)[:-1]]
    pyproject = tomllib.loads((util.REPO / "pyproject.toml").read_text())
    # everything setuptools needs: the project file, its readme, and the packages it includes
    assert "pyproject.toml" in sources
    assert pyproject["project"]["readme"] in sources
    for pkg in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"{pkg.rstrip('*')}/" in sources, pkg
    for src in sources:
        assert (util.REPO / src).exists() or src == pyproject["project"]["readme"], src
    runs = " ".join(a for i, a in build if i == "RUN")
    assert re.search(r"pip wheel .*--wheel-dir /wheels \.", runs), runs


def test_runtime_stage() -> None:
    runtime = dict(stages())["runtime"]
    runs = [a for i, a in runtime if i == "RUN"]
    apt = next(r for r in runs if "apt-get install" in r)
    for pkg in ("e2fsprogs", "xfsprogs", "btrfs-progs", "util-linux"):
        assert re.search(rf"\b{pkg}\b", apt), pkg
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists/*" in apt
    assert "apt-get update" in apt  # same layer as the install
    copies = [a for i, a in runtime if i == "COPY"]
    assert any(c.startswith("--from=build /wheels ") for c in copies), copies
    assert not [c for c in copies if not c.startswith("--from=")], (
        "runtime copies only the built wheels"
    )
    pip = next(r for r in runs if "pip install" in r)
    assert "--no-index" in pip and "stowage-csi==${VERSION}" in pip
    # non-root by default; the node DaemonSet overrides to root + privileged
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1] == "65532:65532"
    assert any("useradd" in r and "--uid 65532" in r for r in runs)
    entry = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert entry == ['["stowage-csi"]'], entry  # exec form, the console script


def test_oci_labels_and_version() -> None:
    runtime = dict(stages())["runtime"]
    labels = " ".join(a for i, a in runtime if i == "LABEL")
    keys = set(re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=", labels))
    assert {
        "org.opencontainers.image.title",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.description",
    } <= keys
    pyproject = tomllib.loads((util.REPO / "pyproject.toml").read_text())
    args = dict(a.split("=", 1) for i, a in runtime if i == "ARG" and "=" in a)
    assert args["VERSION"] == pyproject["project"]["version"]
    assert f'licenses="{pyproject["project"]["license"]}"' in labels


def test_chart_matches_the_image() -> None:
    import yaml

    chart = yaml.safe_load((util.CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((util.CHART / "values.yaml").read_text())
    pyproject = tomllib.loads((util.REPO / "pyproject.toml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]
    assert values["controller"]["runAsUser"] == values["controller"]["runAsGroup"] == 65532


def test_variables_are_declared_in_their_stage() -> None:
    """An ARG before the first FROM is not visible inside a stage unless re-declared there."""
    for name, body in stages():
        declared = set()
        for ins, args in body:
            if ins == "ARG":
                declared.add(args.split("=", 1)[0])
            elif ins == "ENV":
                declared |= set(re.findall(r"(\w+)=", args))
            for var in re.findall(r"\$\{(\w+)\}", args):
                assert var in declared, f"stage {name}: ${{{var}}} used in {ins} but not declared"
