"""deploy/examples: valid against Kubernetes 1.32-1.35 and the VolumeSnapshot CRD, and
consistent with each other and with the chart's default StorageClasses."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest

from driver import validation

from . import util

FILES = sorted(util.EXAMPLES.glob("*.yaml"))


def all_docs() -> list[dict]:
    return [d for path in FILES for d in util.load_yaml_docs(path)]


def test_example_inventory() -> None:
    kinds = {}
    for d in all_docs():
        kinds.setdefault(d["kind"], []).append(d["metadata"]["name"])
    assert set(kinds) == {
        "StorageClass",
        "PersistentVolumeClaim",
        "Pod",
        "Service",
        "StatefulSet",
        "VolumeSnapshot",
        "VolumeAttributesClass",
        "VolumeSnapshotClass",
        "VolumeSnapshotContent",
    }, kinds
    assert (util.EXAMPLES / "README.md").is_file()
    readme = (util.EXAMPLES / "README.md").read_text()
    for path in FILES:
        assert f"`{path.name}`" in readme, f"{path.name} is not described in the examples README"
    assert "kubectl patch pvc" in readme  # the expansion walkthrough


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_is_valid(path) -> None:
    docs = util.load_yaml_docs(path)
    assert docs
    for doc in docs:
        try:
            # VolumeAttributesClass is storage.k8s.io/v1 from Kubernetes 1.34.
            if doc["kind"] == "VolumeAttributesClass":
                util.validate_any(doc, tuple(v for v in util.K8S_VERSIONS if v >= "1.34"))
                continue
            util.validate_any(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            raise AssertionError(
                f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc}"
            ) from exc


def test_examples_reference_what_exists(render) -> None:
    docs = all_docs()
    chart = render()
    classes = {d["metadata"]["name"]: d for d in util.by_kind(chart + docs, "StorageClass")}
    snap_classes = {
        d["metadata"]["name"]: d for d in util.by_kind(chart + docs, "VolumeSnapshotClass")
    }
    contents = {d["metadata"]["name"]: d for d in util.by_kind(docs, "VolumeSnapshotContent")}
    pvcs = {d["metadata"]["name"]: d for d in util.by_kind(docs, "PersistentVolumeClaim")}
    snaps = {d["metadata"]["name"]: d for d in util.by_kind(docs, "VolumeSnapshot")}
    for sc in classes.values():
        assert sc["provisioner"] == "stowage.csi.io"
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    claims = list(pvcs.values()) + [
        t for s in util.by_kind(docs, "StatefulSet") for t in s["spec"]["volumeClaimTemplates"]
    ]
    for pvc in claims:
        assert pvc["spec"]["storageClassName"] in classes, pvc["metadata"]["name"]
        src = pvc["spec"].get("dataSource")
        if src and src["kind"] == "VolumeSnapshot":
            assert src["apiGroup"] == "snapshot.storage.k8s.io" and src["name"] in snaps
        elif src:
            assert src["kind"] == "PersistentVolumeClaim" and src["name"] in pvcs
            assert pvc["spec"]["storageClassName"] == pvcs[src["name"]]["spec"]["storageClassName"]
    for snap in snaps.values():
        if "volumeSnapshotContentName" in snap["spec"]["source"]:  # pre-provisioned: imported
            content = contents[snap["spec"]["source"]["volumeSnapshotContentName"]]
            assert content["spec"]["volumeSnapshotRef"]["name"] == snap["metadata"]["name"]
            assert content["spec"]["deletionPolicy"] == "Retain"  # never deletes the original
            assert content["spec"]["source"]["snapshotHandle"].startswith("b-")
            assert content["metadata"]["labels"][
                "snapshot.storage.kubernetes.io/managed-by"
            ] == util.one(render(), "Deployment", "controller")["metadata"]["name"]
            continue
        assert snap["spec"]["volumeSnapshotClassName"] in snap_classes
        assert snap["spec"]["source"]["persistentVolumeClaimName"] in pvcs
    for cls in snap_classes.values():
        assert cls["driver"] == "stowage.csi.io"
    for pod in util.by_kind(docs, "Pod"):
        for vol in pod["spec"].get("volumes", []):
            assert vol["persistentVolumeClaim"]["claimName"] in pvcs, pod["metadata"]["name"]
    for vac in util.by_kind(docs, "VolumeAttributesClass"):
        assert vac["driverName"] == "stowage.csi.io"
        validation.merge_mutable_parameters({}, vac["parameters"])  # the driver accepts them


def test_block_example_uses_volume_devices() -> None:
    docs = all_docs()
    block_pvcs = {
        d["metadata"]["name"]
        for d in util.by_kind(docs, "PersistentVolumeClaim")
        if d["spec"].get("volumeMode") == "Block"
    }
    assert block_pvcs
    for pod in util.by_kind(docs, "Pod"):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
        }
        for c in pod["spec"]["containers"]:
            for dev in c.get("volumeDevices", []):
                assert claims[dev["name"]] in block_pvcs
            for m in c.get("volumeMounts", []):
                assert claims[m["name"]] not in block_pvcs, "a Block claim must use volumeDevices"


def test_restore_and_clone_consumers_follow_their_source() -> None:
    """Node-local sources: the consumers of restored/cloned claims are pinned to the source pod."""
    docs = all_docs()
    source_pod = next(
        p for p in util.by_kind(docs, "Pod") if p["metadata"]["name"] == "stowage-app"
    )
    local_snaps = {
        d["metadata"]["name"]
        for d in util.by_kind(docs, "VolumeSnapshot")
        if d["spec"].get("volumeSnapshotClassName") == "stowage"
    }
    derived = {
        d["metadata"]["name"]
        for d in util.by_kind(docs, "PersistentVolumeClaim")
        if (src := d["spec"].get("dataSource"))
        and (src["kind"] == "PersistentVolumeClaim" or src["name"] in local_snaps)
    }
    assert len(derived) == 2  # a backup's restore may land anywhere: no affinity needed
    for pod in util.by_kind(docs, "Pod"):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
        if claims & derived:
            (term,) = pod["spec"]["affinity"]["podAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            assert (
                term["labelSelector"]["matchLabels"].items()
                <= source_pod["metadata"]["labels"].items()
            )
