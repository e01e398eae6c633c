"""helm lint, values.schema.json, and schema validation of every rendered object."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest

from . import util
from .util import VALUE_SETS


def test_helm_lint_strict(helm: str) -> None:
    proc = util.helm_run(helm, "lint", "--strict", str(util.CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_value_sets(helm: str, tmp_path, name: str) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps(VALUE_SETS[name]))
    proc = util.helm_run(helm, "lint", "--strict", str(util.CHART), "-f", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a misspelled key (poolDir) at the second level and at the top level
        (["--set", "node.pooldir=/data"], "additional properties 'pooldir' not allowed"),
        (["--set", "snapshotCRD.install=false"], "additional properties 'snapshotCRD' not allowed"),
        (
            ["--set", "sidecars.provisioner.image.tags=v1"],
            "additional properties 'tags' not allowed",
        ),
        # wrong types
        (["--set-string", "controller.replicas=2"], "got string, want integer"),
        (["--set", "node.tolerations=none"], "got string, want array"),
        (["--set-string", "snapshotController.enabled=yes"], "got string, want boolean"),
        # wrong values
        (["--set", "logLevel=verbose"], "logLevel"),
        (["--set", "controller.replicas=0"], "replicas"),
        (["--set", "node.metricsAddress=9810"], "metricsAddress"),
        (["--set", "storageClasses[0].fsType=ntfs"], "fsType"),
    ],
)
@pytest.mark.parametrize("command", ["lint", "template"])
def test_schema_rejects_bad_values(helm: str, command: str, args: list[str], message: str) -> None:
    cmd = (
        [command, str(util.CHART), *args]
        if command == "lint"
        else [command, "x", str(util.CHART), *args]
    )
    proc = util.helm_run(helm, *cmd)
    assert proc.returncode != 0, f"helm {command} accepted {args}"
    assert message in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_values_yaml_satisfies_schema() -> None:
    import yaml

    schema = json.loads((util.CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((util.CHART / "values.yaml").read_text()), schema)

    # additionalProperties: false on every object that declares its properties
    def walk(node: dict, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "values")


def test_kubernetes_validate_supports_target_versions() -> None:
    for version in util.K8S_VERSIONS:
        # raises VersionNotSupportedError for versions without bundled schemas
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
            version,
            strict=True,
        )


def test_kubernetes_validate_strict_catches_unknown_fields() -> None:
    """The validator must be able to fail: an unknown field in a container is an error."""
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "i", "mountPropogation": "x"}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        util.k8s_validate(bad, "1.35")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_are_valid(render, name: str) -> None:
    docs = render(VALUE_SETS[name])
    used: dict[str, int] = {}
    for doc in docs:
        try:
            kind = util.validate_any(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} ({name}): {exc}"
            ) from exc
        used[kind] = used.get(kind, 0) + 1
    assert used["kubernetes"] >= 16, used
    values = VALUE_SETS[name]
    groups = values.get("volumeGroupSnapshots", {})
    classes = int(values.get("volumeSnapshotClass", {}).get("create", True)) + int(
        groups.get("enabled", True) and groups.get("class", {}).get("create", True)
    )
    classes += int(bool(values.get("backup", {}).get("targets")))  # the backup class
    classes += int(values.get("snapshotMetadata", {}).get("enabled", False))  # its service
    assert used.get("crd", 0) == classes, used


def test_default_render_inventory(render) -> None:
    docs = render()
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == {
        "CSIDriver": 1,
        "DaemonSet": 1,
        "Deployment": 2,
        "ServiceAccount": 3,
        "ClusterRole": 5,
        "ClusterRoleBinding": 5,
        "Role": 2,
        "RoleBinding": 2,
        "StorageClass": 3,
        "VolumeSnapshotClass": 1,
        "VolumeGroupSnapshotClass": 1,
        "CustomResourceDefinition": 6,
        "Service": 2,
    }, kinds
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs), "duplicate objects"
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == util.RELEASE, d["metadata"]


def test_snapshot_crds_are_the_pinned_upstream_ones(render) -> None:
    crds = {d["metadata"]["name"]: d for d in util.by_kind(render(), "CustomResourceDefinition")}
    assert set(crds) == {
        "volumesnapshotclasses.snapshot.storage.k8s.io",
        "volumesnapshotcontents.snapshot.storage.k8s.io",
        "volumesnapshots.snapshot.storage.k8s.io",
        "volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io",
        "volumegroupsnapshots.groupsnapshot.storage.k8s.io",
    }
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", name
        assert "api-approved.kubernetes.io" in crd["metadata"]["annotations"], name
        served = {v["name"]: (v["served"], v["storage"]) for v in crd["spec"]["versions"]}
        # v1 served everywhere (external-snapshotter #1385); the group CRDs of v8.6.0 still
        # store v1beta2 while clusters migrate, the snapshot CRDs store v1.
        assert served["v1"][0], served
        assert served["v1"][1] or "groupsnapshot" in name, served
    # identical to the files shipped in the chart (only metadata was added)
    shipped = {
        d["metadata"]["name"]: d
        for p in util.CRD_DIR.glob("*.yaml")
        for d in util.load_yaml_docs(p)
    }
    for name, crd in crds.items():
        assert crd["spec"] == shipped[name]["spec"], name
    assert not util.by_kind(render(VALUE_SETS["no-snapshot-crds"]), "CustomResourceDefinition")


def test_every_create_time_cel_rule_is_translated() -> None:
    """Walk every served schema: each CEL rule without oldSelf must be in util.CEL_RULES."""
    seen: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []) or []:
                text = " ".join(rule["rule"].split())
                if "oldSelf" not in text:
                    seen.add(text)
            for sub in node.values():
                walk(sub)
        elif isinstance(node, list):
            for sub in node:
                walk(sub)

    for schema in util.crd_schemas().values():
        walk(schema)
    assert seen, "the pinned CRDs carry CEL rules; finding none means the walk is broken"
    assert seen <= set(util.CEL_RULES), seen - set(util.CEL_RULES)


def test_crd_validator_can_fail() -> None:
    good = {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "s"},
        "spec": {"source": {"persistentVolumeClaimName": "p"}},
    }
    util.crd_validate(good)
    for bad_spec in (
        {},  # source is required
        {"source": {}},  # CEL: exactly one source
        {"source": {"persistentVolumeClaimName": "p", "volumeSnapshotContentName": "c"}},
        {"source": {"persistentVolumeClaimName": "p"}, "volumeSnapshotClassName": ""},  # CEL
        {"source": {"persistentVolumeClaimName": "p"}, "volumeSnapshotClass": "typo"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            util.crd_validate({**good, "spec": bad_spec})
    with pytest.raises(jsonschema.ValidationError):
        util.crd_validate(
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshotClass",
                "metadata": {"name": "c"},
                "driver": "d",
                "deletionPolicy": "Keep",
            }
        )


def test_kube_version_constraint(helm: str) -> None:
    """Chart.yaml kubeVersion >=1.30.0-0: 1.30 renders, 1.29 is refused."""
    ok = util.helm_run(helm, "template", "x", str(util.CHART), "--kube-version", "v1.30.0")
    assert ok.returncode == 0, ok.stderr
    old = util.helm_run(helm, "template", "x", str(util.CHART), "--kube-version", "v1.29.9")
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr
