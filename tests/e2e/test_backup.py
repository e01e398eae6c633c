"""Backups that leave the node, through Kubernetes (issue 16): two more nodes, each with its own
pool, node-mode driver and node-deployed csi-provisioner/csi-snapshotter as the chart runs them,
sharing the session's loopback S3 as backup target `main`.

A claim on node A is snapshotted with the chart's backup class; node A is destroyed (sidecars
and driver stopped, pool unmounted and removed, Node object deleted); a claim from that
VolumeSnapshot binds on node B through B's provisioner and holds the same bytes; an import of
the backup through a pre-provisioned content (Retain) never deletes it; and the VolumeSnapshot
is deleted although its volume and node are gone, by the controller's node-independent
csi-snapshotter once the content is handed to it (the runbook in docs/backup.md), after which
the manifest is gone from the object store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from driver.ctl.client import Client
from harness import make_pool
from tests.e2e.cluster import (
    BACKUP_BUCKET,
    BACKUP_TARGET,
    DRIVER,
    E2E,
    SNAP_GROUP,
    SNAP_VERSION,
    TOPOLOGY_KEY,
    fake_node,
    start_node_driver,
    wait,
)
from tests.e2e.test_e2e import NS, Staged, bound, gone
from tests.integration.helpers import sha256, write_random

MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
CONTROLLER_IDENTITY = "stw-stowage-controller"  # the chart's default: <fullname>-controller
NODE_SIDECARS = ("csi-provisioner", "csi-snapshotter")


@dataclass
class ExtraNode:
    name: str
    socket: str
    client: Client
    teardown_pool: Callable[[], None]
    procs: tuple[str, ...]
    destroyed: bool = False

    def destroy(self, e: E2E) -> None:
        """The node dies: its sidecars and driver stop, its pool is unmounted and removed, its
        Node and CSINode objects are deleted."""
        self.client.close()
        for name in self.procs:
            e.cluster.procs[name].stop()
        self.teardown_pool()
        self.destroyed = True
        e.storage.delete_csi_node(self.name)
        e.core.delete_node(self.name)


@pytest.fixture
def nodes(e2e: E2E) -> Iterator[Callable[[str], ExtraNode]]:
    made: list[ExtraNode] = []

    def add(name: str) -> ExtraNode:
        pool, teardown = make_pool("xfs", 8 << 30)
        sock = os.path.join(pool.base, "csi.sock")
        node = ExtraNode(name, sock, Client("unix://" + sock, timeout=120), teardown, ())
        made.append(node)
        start_node_driver(e2e.cluster, name, sock, pool.mount)
        fake_node(e2e, contextlib.ExitStack(), name)
        wait(lambda: e2e.pod_of("node", name), 60, f"the chart DaemonSet's pod for {name}")
        for sidecar in NODE_SIDECARS:
            e2e.start_sidecar(sidecar, proc_name=f"{sidecar}-{name}", node=name, node_socket=sock)
        node.procs = (*(f"{s}-{name}" for s in NODE_SIDECARS), f"driver-{name}")
        return node

    try:
        yield add
    finally:
        for node in reversed(made):
            if node.destroyed:
                continue
            node.client.close()
            for proc in node.procs:
                if proc in e2e.cluster.procs:
                    e2e.cluster.procs[proc].stop()
            node.teardown_pool()
            with contextlib.suppress(client.ApiException):
                e2e.core.delete_node(node.name)
            with contextlib.suppress(client.ApiException):
                e2e.storage.delete_csi_node(node.name)


def claim(e: E2E, name: str, node: str, source: dict[str, str] | None = None) -> None:
    """A claim the scheduler placed on `node` (there is no pod to schedule in this tier)."""
    e.create_claim(
        name, "64Mi", "stowage", source=source, namespace=NS,
        annotations={"volume.kubernetes.io/selected-node": node},
    )  # fmt: skip


def manifests(e: E2E) -> list[str]:
    assert e.cluster.s3 is not None
    resp = e.cluster.s3.client().list_objects_v2(  # type: ignore[attr-defined]
        Bucket=BACKUP_BUCKET, Prefix="e2e/manifests/"
    )
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in resp.get("Contents", []))


def content_of(e: E2E, snapshot: str) -> dict[str, Any]:
    snap = e.custom.get_namespaced_custom_object(
        SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots", snapshot
    )
    return dict(
        e.custom.get_cluster_custom_object(
            SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents",
            snap["status"]["boundVolumeSnapshotContentName"],
        )
    )


def ready(e: E2E, snapshot: str) -> bool:
    s = e.custom.get_namespaced_custom_object(
        SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots", snapshot
    )
    return bool(s.get("status", {}).get("readyToUse"))


def delete_snapshot(e: E2E, snapshot: str) -> None:
    e.custom.delete_namespaced_custom_object(
        SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots", snapshot
    )


def test_a_backup_outlives_its_node_restores_on_another_and_is_deleted_without_it(
    e2e: E2E, nodes: Callable[[str], ExtraNode]
) -> None:
    a, b = nodes("node-a"), nodes("node-b")
    # --- a claim on node A, written through A's driver ---------------------------------------
    claim(e2e, "precious", a.name)
    pv = bound(e2e, "precious")
    term = pv.spec.node_affinity.required.node_selector_terms[0].match_expressions[0]
    assert (term.key, term.values) == (TOPOLOGY_KEY, [a.name])
    with Staged(e2e, pv, node=a.client) as s:  # A's node RPCs, as A's kubelet would call them
        digest = write_random(os.path.join(s.target, "data"), 8)

    # --- the backup: the chart's backup class, taken and uploaded by A's snapshotter ---------
    snap = e2e.snapshot("precious-backup", "precious", NS, snapshot_class="stowage-backup")
    content = content_of(e2e, "precious-backup")
    handle = content["status"]["snapshotHandle"]
    assert handle.startswith(f"b-{BACKUP_TARGET}-"), handle
    assert content["metadata"]["labels"][MANAGED_BY] == a.name  # distributed snapshotting
    assert snap["status"]["restoreSize"]
    assert manifests(e2e) == [handle]

    # --- node A is gone ---------------------------------------------------------------------
    a.destroy(e2e)

    # --- restored on node B through B's node-deployed provisioner ---------------------------
    source = {"apiGroup": SNAP_GROUP, "kind": "VolumeSnapshot", "name": "precious-backup"}
    claim(e2e, "rescued", b.name, source)
    pv_b = bound(e2e, "rescued", timeout=180)
    term = pv_b.spec.node_affinity.required.node_selector_terms[0].match_expressions[0]
    assert (term.key, term.values) == (TOPOLOGY_KEY, [b.name])
    assert pv_b.spec.csi.driver == DRIVER
    with Staged(e2e, pv_b, node=b.client) as s:
        assert sha256(os.path.join(s.target, "data")) == digest

    # --- an import of the backup (pre-provisioned, Retain) never deletes it -------------------
    imported = {
        "apiVersion": f"{SNAP_GROUP}/{SNAP_VERSION}",
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": "imported-content", "labels": {MANAGED_BY: CONTROLLER_IDENTITY}},
        "spec": {
            "driver": DRIVER,
            "deletionPolicy": "Retain",
            "source": {"snapshotHandle": handle},
            "volumeSnapshotRef": {"name": "imported", "namespace": NS},
        },
    }
    e2e.custom.create_cluster_custom_object(
        SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents", imported
    )
    e2e.custom.create_namespaced_custom_object(
        SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots",
        {
            "apiVersion": f"{SNAP_GROUP}/{SNAP_VERSION}",
            "kind": "VolumeSnapshot",
            "metadata": {"name": "imported"},
            "spec": {"source": {"volumeSnapshotContentName": "imported-content"}},
        },
    )  # fmt: skip
    # readyToUse comes from the controller's snapshotter: ListSnapshots on the manifest
    wait(lambda: ready(e2e, "imported"), 90, "the imported VolumeSnapshot readyToUse")
    delete_snapshot(e2e, "imported")
    wait(
        lambda: gone(
            e2e.custom.get_namespaced_custom_object,
            SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots", "imported",
        ),
        60,
        "the imported VolumeSnapshot deleted",
    )  # fmt: skip
    assert manifests(e2e) == [handle]  # Retain: the backup stays
    e2e.custom.delete_cluster_custom_object(
        SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents", "imported-content"
    )

    # --- the runbook: the source claim goes, its PV (node gone) by removing its finalizer ------
    e2e.core.delete_namespaced_persistent_volume_claim("precious", NS)
    wait(lambda: gone(e2e.core.read_namespaced_persistent_volume_claim, "precious", NS), 60,
         "claim precious deleted")
    e2e.core.delete_persistent_volume(pv.metadata.name)
    e2e.core.patch_persistent_volume(pv.metadata.name, {"metadata": {"finalizers": None}})
    wait(lambda: gone(e2e.core.read_persistent_volume, pv.metadata.name), 60,
         "node A's PV deleted")

    # --- and the content is handed to the controller: the VolumeSnapshot can be deleted ------
    name = content["metadata"]["name"]
    e2e.custom.patch_cluster_custom_object(
        SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents", name,
        {"metadata": {"labels": {MANAGED_BY: CONTROLLER_IDENTITY}}},
    )  # fmt: skip
    delete_snapshot(e2e, "precious-backup")
    wait(
        lambda: gone(
            e2e.custom.get_cluster_custom_object,
            SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents", name,
        ),
        90,
        "the backup's VolumeSnapshotContent deleted by the controller's snapshotter",
    )  # fmt: skip
    assert manifests(e2e) == []
    assert f"deleted backup manifest {handle}" in e2e.cluster.logs("driver-controller")

    # node B's restored volume is independent of the backup
    e2e.core.delete_namespaced_persistent_volume_claim("rescued", NS)
    wait(lambda: gone(e2e.core.read_persistent_volume, pv_b.metadata.name), 60, "PV deleted")
