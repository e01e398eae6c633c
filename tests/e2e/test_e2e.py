"""Kubernetes drives Stowage through the real sidecars (issue 4).

The node socket is also used the way a kubelet would use it (stage, publish, expand), because
there is no kubelet in this tier; data is compared by sha256 after going through the driver.
"""

from __future__ import annotations

import glob
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from driver.ctl.client import Client, capability
from tests.e2e.cluster import (
    DENIED,
    DRIVER,
    E2E,
    NAMESPACE,
    NODE,
    REPO,
    SNAP_GROUP,
    SNAP_VERSION,
    TOPOLOGY_KEY,
    wait,
)
from tests.integration.helpers import sha256, write_random

NS = "default"


# --- helpers ------------------------------------------------------------------------------------
def pvc(
    e: E2E,
    name: str,
    size: str = "64Mi",
    sc: str = "stowage",
    block: bool = False,
    source: dict[str, str] | None = None,
) -> client.V1PersistentVolumeClaim:
    """A claim the scheduler has placed on our node (it sets volume.kubernetes.io/selected-node
    for WaitForFirstConsumer classes; there is no pod to schedule here, so the test does)."""
    selected = {"volume.kubernetes.io/selected-node": NODE}
    return e.create_claim(name, size, sc, block, source, annotations=selected, namespace=NS)


def bound(e: E2E, name: str, timeout: float = 90) -> client.V1PersistentVolume:
    claim = wait(
        lambda: (
            (c := e.core.read_namespaced_persistent_volume_claim(name, NS)).status.phase == "Bound"
            and c
        ),
        timeout,
        f"PVC {name} Bound",
    )
    pv = e.core.read_persistent_volume(claim.spec.volume_name)
    assert pv.spec.csi.driver == DRIVER
    return pv


def image_path(e: E2E, volume_id: str) -> str:
    return os.path.join(e.cluster.pool_dir, "volumes", volume_id + ".img")


class Staged:
    """Stage and publish a PV through the node socket, as kubelet would for a pod."""

    def __init__(
        self, e: E2E, pv: client.V1PersistentVolume, fs: str = "ext4", node: Client | None = None
    ) -> None:
        """`node`: the node plugin to call (default: the session node's)."""
        self.e, self.vid = e, pv.spec.csi.volume_handle
        self.node = node or e.node
        tag = uuid.uuid4().hex[:8]
        self.staging = e.cluster.path(f"staging-{tag}")
        self.target = e.cluster.path(f"target-{tag}")
        self.cap = capability(False, fs)
        os.makedirs(self.staging)

    def __enter__(self) -> Staged:
        self.node.stage(self.vid, self.staging, self.cap)
        self.node.publish(self.vid, self.staging, self.target, self.cap)
        return self

    def __exit__(self, *exc: object) -> None:
        self.node.unpublish(self.vid, self.target)
        self.node.unstage(self.vid, self.staging)


def delete_claim(e: E2E, name: str) -> None:
    e.core.delete_namespaced_persistent_volume_claim(name, NS)


def gone(read: Any, *args: Any) -> bool:
    try:
        read(*args)
    except ApiException as exc:
        return exc.status == 404
    return False


@pytest.fixture
def data_claim(e2e: E2E) -> Iterator[tuple[str, client.V1PersistentVolume, str]]:
    """A bound ext4 claim holding 8 MiB of random bytes; its digest."""
    name = f"data-{uuid.uuid4().hex[:6]}"
    pvc(e2e, name)
    pv = bound(e2e, name)
    with Staged(e2e, pv) as s:
        digest = write_random(os.path.join(s.target, "data"), 8)
    yield name, pv, digest
    delete_claim(e2e, name)


# --- tests --------------------------------------------------------------------------------------
def test_pvc_binds_through_node_deployed_provisioner_and_capacity_is_published(e2e: E2E) -> None:
    pvc(e2e, "first")
    pv = bound(e2e, "first")
    terms = pv.spec.node_affinity.required.node_selector_terms
    assert terms[0].match_expressions[0].key == TOPOLOGY_KEY
    assert terms[0].match_expressions[0].values == [NODE]
    assert os.path.exists(image_path(e2e, pv.spec.csi.volume_handle))

    def capacities() -> list[Any]:
        caps = e2e.storage.list_namespaced_csi_storage_capacity(NAMESPACE).items
        return [
            c
            for c in caps
            if c.storage_class_name == "stowage"
            and c.node_topology.match_labels == {TOPOLOGY_KEY: NODE}
            and c.capacity
        ]

    caps = wait(capacities, 120, "CSIStorageCapacity for class stowage on the node")
    assert caps[0].maximum_volume_size is not None
    owner = caps[0].metadata.owner_references[0]
    assert owner.kind == "DaemonSet"  # --capacity-ownerref-level=1 from the chart
    delete_claim(e2e, "first")
    wait(lambda: gone(e2e.core.read_persistent_volume, pv.metadata.name), 60, "PV deleted")


def attachments_of(e2e: E2E, pv: client.V1PersistentVolume) -> list[str]:
    return [
        str(v.metadata.name)
        for v in e2e.storage.list_volume_attachment().items
        if v.spec.source.persistent_volume_name == pv.metadata.name
    ]


def test_a_pod_on_the_node_needs_no_volume_attachment(e2e: E2E, data_claim: Any) -> None:
    """attachRequired: false. A pod bound to the node with the claim gives kube-controller-
    manager's attach/detach controller all it needs to create a VolumeAttachment (the node is
    controller-managed); with attachRequired: true one appears within a second. None may
    appear: pod start waits on no attacher and no controller replica."""
    name, pv, _digest = data_claim
    assert e2e.storage.read_csi_driver(DRIVER).spec.attach_required is False
    pod = f"user-{uuid.uuid4().hex[:6]}"
    e2e.core.create_namespaced_pod(
        NS,
        {
            "metadata": {"name": pod},
            "spec": {
                "nodeName": NODE,  # as the scheduler would bind it
                "containers": [{"name": "c", "image": "registry.local/none"}],
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": name}}],
            },
        },
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert attachments_of(e2e, pv) == []
            time.sleep(0.5)
    finally:
        e2e.core.delete_namespaced_pod(pod, NS, grace_period_seconds=0)
        wait(lambda: gone(e2e.core.read_namespaced_pod, pod, NS), 60, f"pod {pod} deleted")


def test_snapshot_restore_and_clone_carry_the_bytes(e2e: E2E, data_claim: Any) -> None:
    name, _pv, digest = data_claim
    snap = e2e.snapshot(f"snap-{name}", name, NS)
    assert snap["status"]["restoreSize"]
    copies = {
        "restored": {"apiGroup": SNAP_GROUP, "kind": "VolumeSnapshot", "name": f"snap-{name}"},
        "cloned": {"kind": "PersistentVolumeClaim", "name": name},
    }
    for kind, source in copies.items():
        claim = f"{kind}-{name}"
        pvc(e2e, claim, source=source)
        pv = bound(e2e, claim)
        with Staged(e2e, pv) as s:
            assert sha256(os.path.join(s.target, "data")) == digest, kind
        delete_claim(e2e, claim)
    e2e.custom.delete_namespaced_custom_object(
        SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots", f"snap-{name}"
    )
    wait(
        lambda: not os.listdir(os.path.join(e2e.cluster.pool_dir, "snapshots")),
        60,
        "snapshot image removed (deletionPolicy Delete)",
    )


def test_resize_expands_controller_then_node(e2e: E2E) -> None:
    # xfs: online growth needs no extra capability (ext4's needs CAP_SYS_RESOURCE)
    pvc(e2e, "grow", size="320Mi", sc="stowage-xfs")
    pv = bound(e2e, "grow")
    with Staged(e2e, pv, fs="xfs") as s:
        before = os.statvfs(s.target)
        e2e.core.patch_namespaced_persistent_volume_claim(
            "grow", NS, {"spec": {"resources": {"requests": {"storage": "640Mi"}}}}
        )
        wait(
            lambda: (
                e2e.core.read_persistent_volume(pv.metadata.name).spec.capacity["storage"]
                == "640Mi"
            ),
            90,
            "csi-resizer: ControllerExpandVolume and PV capacity 640Mi",
        )
        wait(
            lambda: any(
                c.type == "FileSystemResizePending"
                for c in e2e.core.read_namespaced_persistent_volume_claim(
                    "grow", NS
                ).status.conditions
                or []
            ),
            60,
            "PVC condition FileSystemResizePending (node expansion is the kubelet's part)",
        )
        # controller mode answered the size; nothing grew yet (it has no pool)
        assert os.path.getsize(image_path(e2e, pv.spec.csi.volume_handle)) == 320 << 20
        e2e.node.node_expand(pv.spec.csi.volume_handle, s.target, 640 << 20)
        after = os.statvfs(s.target)
        assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + (200 << 20)
    assert os.path.getsize(image_path(e2e, pv.spec.csi.volume_handle)) >= 640 << 20
    delete_claim(e2e, "grow")


def test_reclaim_delete_removes_the_image_retain_keeps_it(e2e: E2E) -> None:
    pvc(e2e, "del")
    pvc(e2e, "keep", sc="stowage-block", block=True)  # the chart's block class is Retain
    deleted, kept = bound(e2e, "del"), bound(e2e, "keep")
    delete_claim(e2e, "del")
    delete_claim(e2e, "keep")
    wait(lambda: gone(e2e.core.read_persistent_volume, deleted.metadata.name), 60, "PV deleted")
    assert not os.path.exists(image_path(e2e, deleted.spec.csi.volume_handle))
    wait(
        lambda: e2e.core.read_persistent_volume(kept.metadata.name).status.phase == "Released",
        60,
        "Retain PV Released",
    )
    assert os.path.exists(image_path(e2e, kept.spec.csi.volume_handle))
    e2e.core.delete_persistent_volume(kept.metadata.name)


def test_every_chart_object_and_example_passes_server_side_dry_run(e2e: E2E) -> None:
    docs = list(e2e.cluster.rendered)
    for path in sorted(glob.glob(os.path.join(REPO, "deploy", "examples", "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            docs += [d for d in yaml.safe_load_all(fh) if d]
    checked = 0
    for d in docs:
        res = e2e.dyn.resources.get(api_version=d["apiVersion"], kind=d["kind"])
        ns = (d["metadata"].get("namespace") or NAMESPACE) if res.namespaced else None
        e2e.dyn.server_side_apply(
            res,
            body=d,
            name=d["metadata"]["name"],
            namespace=ns,
            field_manager="stowage-e2e",
            force_conflicts=True,
            dry_run="All",
        )
        checked += 1
    print(f"  server-side dry-run accepted {checked} objects")
    assert checked >= len(e2e.cluster.rendered) + 5


def test_a_sidecar_missing_one_rbac_rule_is_caught(e2e: E2E) -> None:
    """The RBAC check can fail: csi-resizer without `patch persistentvolumeclaims/status`
    cannot resize, and its log shows the denial the autouse check looks for."""
    role = next(
        r for r in e2e.cluster.objects("ClusterRole") if r["metadata"]["name"].endswith("-resizer")
    )
    crippled_rules = [
        r for r in role["rules"] if r["resources"] != ["persistentvolumeclaims/status"]
    ]
    assert len(crippled_rules) == len(role["rules"]) - 1
    sa = "e2e-crippled-resizer"
    e2e.core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": sa}})
    e2e.rbac.create_cluster_role({"metadata": {"name": sa}, "rules": crippled_rules})
    e2e.rbac.create_cluster_role_binding(
        {
            "metadata": {"name": sa},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
        }
    )
    pvc(e2e, "denied", size="320Mi", sc="stowage-xfs")
    pv = bound(e2e, "denied")
    main = e2e.cluster.procs["csi-resizer"]
    main.stop()
    try:
        e2e.start_sidecar("csi-resizer", e2e.sa_kubeconfig(sa), proc_name="crippled-resizer")
        e2e.core.patch_namespaced_persistent_volume_claim(
            "denied", NS, {"spec": {"resources": {"requests": {"storage": "640Mi"}}}}
        )
        crippled = e2e.cluster.procs["crippled-resizer"]
        # the same pattern the autouse check applies to every chart sidecar's log
        wait(lambda: DENIED.search(crippled.log()), 60, "the crippled resizer to be denied")
        time.sleep(2)
        assert e2e.core.read_persistent_volume(pv.metadata.name).spec.capacity["storage"] == "320Mi"
        crippled.stop()
    finally:
        e2e.cluster.procs.pop("crippled-resizer").stop()
        main.start()
    wait(
        lambda: (
            e2e.core.read_persistent_volume(pv.metadata.name).spec.capacity["storage"] == "640Mi"
        ),
        90,
        "the chart's resizer to resize it",
    )
    delete_claim(e2e, "denied")
