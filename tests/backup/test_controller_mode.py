"""Controller mode with the backup targets: the node-independent handler of backup snapshots
(docs/design.md, "Who handles which snapshot"). A backup taken on node A is described, listed
and deleted by a controller-mode process that has no pool, as the chart's controller
csi-snapshotter drives it once node A is gone; another cluster's controller never deletes it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import grpc
import pytest

from csi_proto import csi_pb2
from driver.ctl.client import Client
from harness import REPO, Pool, read_log
from tests.backup.conftest import S3Server, start_server
from tests.backup.test_csi_backup import (
    CLUSTER,
    KEY_A,
    PARAMS,
    code_of,
    make_data_volume,
    manifests,
    node,
    spec_for,
    until_ready,
)
from tests.integration.helpers import MiB


@pytest.fixture(scope="module")
def weed() -> Iterator[S3Server]:
    """Controller mode against SeaweedFS (the CSI backup tests cover both servers)."""
    server, teardown = start_server("seaweedfs")
    try:
        yield server
    finally:
        teardown()
pytestmark = pytest.mark.root
RPC = csi_pb2.ControllerServiceCapability.RPC


@pytest.fixture
def controllers() -> Iterator[Callable[..., Client]]:
    """Controller-mode drivers (no pool) with the target; stopped by PID, files removed."""
    started: list[tuple[subprocess.Popen[bytes], Client, str]] = []

    def start(spec: str, cluster: str = CLUSTER, key: str = KEY_A) -> Client:
        base = tempfile.mkdtemp(prefix="stowage-controller-")
        key_file = os.path.join(base, "backup.key")
        with open(key_file, "w", encoding="ascii") as fh:
            fh.write(key + "\n")
        sock = os.path.join(base, "csi.sock")
        log_path = os.path.join(base, "driver.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "driver", "--mode", "controller",
                 "--endpoint", "unix://" + sock, "--backup-target", spec,
                 "--backup-key-file", key_file, "--backup-cluster-id", cluster],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        client = Client("unix://" + sock, timeout=60)
        started.append((proc, client, base))
        try:
            client.wait_ready(30)
        except TimeoutError:
            raise AssertionError("controller did not start:\n" + read_log(log_path)) from None
        return client

    try:
        yield start
    finally:
        for proc, client, base in started:
            client.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            subprocess.run(["rm", "-rf", base], check=False)


def test_controller_mode_serves_backup_snapshots_of_a_gone_node(
    weed: S3Server,
    pools: Callable[[], Pool],
    drivers: list[object],
    controllers: Callable[..., Client],
) -> None:
    bucket = weed.make_bucket()
    spec = spec_for(weed, bucket)
    pool_a = pools()
    a = node(pool_a, drivers, spec).start()  # type: ignore[arg-type]
    vol, _digest = make_data_volume(a, pool_a, "src", 4)
    snap = until_ready(a, "nightly", vol)
    a.close()
    drivers[0].stop()  # type: ignore[attr-defined]  # node A is gone

    ctrl = controllers(spec)
    caps = {
        c.rpc.type
        for c in ctrl.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest()
        ).capabilities
    }
    assert caps == {RPC.EXPAND_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                    RPC.GET_SNAPSHOT}
    # what csi-snapshotter asks for a pre-provisioned content: ListSnapshots by ID
    by_id = csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)
    listed = ctrl.controller.ListSnapshots(by_id)
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]
    got = listed.entries[0].snapshot
    assert got.ready_to_use and got.source_volume_id == vol and got.size_bytes == 128 * MiB
    assert [e.snapshot.snapshot_id for e in ctrl.list_snapshots()] == [snap.snapshot_id]
    unknown = "b-main-" + "0" * 32
    assert not ctrl.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(snapshot_id=unknown)
    ).entries
    assert code_of(lambda: ctrl.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=unknown))) is grpc.StatusCode.NOT_FOUND
    # taking a snapshot needs the volume's node
    assert code_of(lambda: ctrl.create_snapshot("x", vol, PARAMS)) is (
        grpc.StatusCode.FAILED_PRECONDITION
    )

    # another cluster that imported the backup deletes its content: the backup stays
    other = controllers(spec, cluster="other-cluster")
    other.delete_snapshot(snap.snapshot_id)
    assert manifests(weed, bucket) == [snap.snapshot_id]

    ctrl.delete_snapshot(snap.snapshot_id)
    assert manifests(weed, bucket) == []
    ctrl.delete_snapshot(snap.snapshot_id)  # idempotent
    ctrl.delete_snapshot("s-" + "1" * 32)  # a node-local snapshot of a gone node: nothing to do
