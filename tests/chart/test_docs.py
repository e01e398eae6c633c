"""The chart README documents every value; the install guide matches the chart and examples."""

from __future__ import annotations

import re

import yaml

from . import util

FREE_FORM = {
    "resources",
    "nodeSelector",
    "affinity",
    "podAnnotations",
    "podLabels",
    "parameters",
    "labels",
    "updateStrategy",
    "tolerations",
}


def value_paths(node: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in FREE_FORM:
            out |= value_paths(value, path + ".")
        elif (
            isinstance(value, list)
            and value
            and isinstance(value[0], dict)
            and key == "storageClasses"
        ):
            out.add(path)
            out |= {f"{path}[].{k}" for k in value[0]}
        else:
            out.add(path)
    return out


def readme_keys() -> set[str]:
    text = (util.CHART / "README.md").read_text()
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((util.CHART / "values.yaml").read_text())
    paths = value_paths(values)
    documented = readme_keys()
    assert paths - documented == set(), f"undocumented values: {sorted(paths - documented)}"
    stale = {k for k in documented - paths if "." in k or k in values}
    assert not stale, f"README documents values that do not exist: {sorted(stale)}"


def test_documented_pins_match_values() -> None:
    values = yaml.safe_load((util.CHART / "values.yaml").read_text())
    readme = (util.CHART / "README.md").read_text()
    for side in values["sidecars"].values():
        assert f"{side['image']['repository']}:{side['image']['tag']}" in readme
    sc = values["snapshotController"]["image"]
    assert f"{sc['repository']}:{sc['tag']}" in readme


def test_install_guide() -> None:
    guide = (util.REPO / "docs" / "kubernetes.md").read_text()
    assert "helm install stowage charts/stowage" in guide
    for path in sorted(util.EXAMPLES.glob("*.yaml")):
        assert path.name in guide, f"docs/kubernetes.md does not list {path.name}"
    for name in re.findall(r"`(\d\d-[a-z-]+\.yaml)`", guide):
        assert (util.EXAMPLES / name).is_file(), name
    helm_version = re.search(
        r"VERSION=\$\{HELM_VERSION:-(v[0-9.]+)\}",
        (util.REPO / "tests/tools/install-helm.sh").read_text(),
    ).group(1)
    assert f"helm {helm_version}" in guide
    # every value the guide's table mentions exists
    values = value_paths(yaml.safe_load((util.CHART / "values.yaml").read_text()))
    for key in re.findall(
        r"`((?:node|controller|image|metrics|snapshotCRDs|snapshotController)\.[A-Za-z.]+)`", guide
    ):
        assert key in values, key
