"""Group snapshots (CSI GroupController) on a real XFS pool: members frozen together and copied,
restorable with their bytes; every bad request answered with its code and nothing changed."""

from __future__ import annotations

import contextlib
import os

import grpc
import pytest

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.ctl.client import Client, block_cap, mount_cap
from tests.conftest import DriverProcess, Pool, make_pool
from tests.integration.helpers import MiB, Mounted, sha256, status_code, write_random


def _state(pool: Pool, client: Client) -> tuple[list[str], list[str]]:
    """What a refused call must leave as it was: snapshot rows and snapshot images."""
    rows = sorted(e.snapshot.snapshot_id for e in client.list_snapshots())
    return rows, sorted(os.listdir(os.path.join(pool.mount, "snapshots")))


def test_group_snapshot_life_and_bad_requests(pool: Pool, driver: DriverProcess, client: Client):
    groups = csi_pb2_grpc.GroupControllerStub(client.channel)
    caps = client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    gcaps = groups.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in gcaps.capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]

    a = client.create_volume("a", 128 * MiB, mount_cap("ext4")).volume_id
    b = client.create_volume("b", 320 * MiB, mount_cap("xfs")).volume_id
    c = client.create_volume("c", 64 * MiB, block_cap()).volume_id
    ma = Mounted(client, pool.base, a, fs_type="ext4").up()
    mb = Mounted(client, pool.base, b, fs_type="xfs").up()
    try:
        da = write_random(os.path.join(ma.target, "data"), 4)
        db = write_random(os.path.join(mb.target, "data"), 4)
        with open(os.path.join(pool.mount, "volumes", c + ".img"), "r+b") as fh:
            fh.write(b"\xc3" * MiB)
        dc = sha256(os.path.join(pool.mount, "volumes", c + ".img"))

        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g1", source_volume_ids=[a, b, c])
        group = groups.CreateVolumeGroupSnapshot(req).group_snapshot
        assert group.group_snapshot_id.startswith("g-") and group.ready_to_use
        members = {s.source_volume_id: s for s in group.snapshots}
        assert set(members) == {a, b, c}
        assert all(s.group_snapshot_id == group.group_snapshot_id for s in group.snapshots)
        ids = [s.snapshot_id for s in group.snapshots]
        # Thawed: both filesystems take writes again at once.
        for m in (ma, mb):
            with open(os.path.join(m.target, "after"), "wb") as fh:
                fh.write(b"x")
                os.fsync(fh.fileno())
        # Idempotent retry; the same name for other volumes is refused.
        again = groups.CreateVolumeGroupSnapshot(req).group_snapshot
        assert again.group_snapshot_id == group.group_snapshot_id
        listed = {e.snapshot.snapshot_id: e.snapshot for e in client.list_snapshots()}
        assert set(listed) == set(ids)
        assert {s.group_snapshot_id for s in listed.values()} == {group.group_snapshot_id}
        got = groups.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
            )
        ).group_snapshot
        assert sorted(s.snapshot_id for s in got.snapshots) == sorted(ids)

        before = _state(pool, client)
        refused = {
            "other volumes, same name": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(name="g1", source_volume_ids=[a])
                ),
                grpc.StatusCode.ALREADY_EXISTS,
            ),
            "duplicate member": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(name="g2", source_volume_ids=[a, a])
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "no members": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(name="g2")
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "no name": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(source_volume_ids=[a])
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "malformed member (no volume of ours has that ID)": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(
                        name="g2", source_volume_ids=[a, "../../etc"]
                    )
                ),
                grpc.StatusCode.NOT_FOUND,
            ),
            "unknown volume": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(
                        name="g2", source_volume_ids=["v-" + "0" * 32]
                    )
                ),
                grpc.StatusCode.NOT_FOUND,
            ),
            "unknown parameter": (
                lambda: groups.CreateVolumeGroupSnapshot(
                    csi_pb2.CreateVolumeGroupSnapshotRequest(
                        name="g2", source_volume_ids=[a], parameters={"x": "y"}
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "member deleted alone": (
                lambda: client.delete_snapshot(ids[0]),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            "get with other members": (
                lambda: groups.GetVolumeGroupSnapshot(
                    csi_pb2.GetVolumeGroupSnapshotRequest(
                        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[:1]
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "delete with other members": (
                lambda: groups.DeleteVolumeGroupSnapshot(
                    csi_pb2.DeleteVolumeGroupSnapshotRequest(
                        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[:2]
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "get unknown": (
                lambda: groups.GetVolumeGroupSnapshot(
                    csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="g-" + "1" * 32)
                ),
                grpc.StatusCode.NOT_FOUND,
            ),
        }
        for what, (call, want) in refused.items():
            assert status_code(call) is want, what
            assert _state(pool, client) == before, what

        # Each member restores to its volume's bytes at the moment of the group snapshot.
        sa, sb, sc = (members[v].snapshot_id for v in (a, b, c))
        ra = client.create_volume("ra", 128 * MiB, mount_cap("ext4"), snapshot=sa)
        rb = client.create_volume("rb", 320 * MiB, mount_cap("xfs"), snapshot=sb)
        rc = client.create_volume("rc", 64 * MiB, block_cap(), snapshot=sc)
        with Mounted(client, pool.base, ra.volume_id, fs_type="ext4") as m:
            assert sha256(os.path.join(m.target, "data")) == da
        with Mounted(client, pool.base, rb.volume_id, fs_type="xfs") as m:
            assert sha256(os.path.join(m.target, "data")) == db
        assert sha256(os.path.join(pool.mount, "volumes", rc.volume_id + ".img")) == dc
        for v in (ra, rb, rc):
            client.delete_volume(v.volume_id)

        groups.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
            )
        )
        assert _state(pool, client) == ([], [])
        assert status_code(
            lambda: groups.DeleteVolumeGroupSnapshot(
                csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
            )
        ) is grpc.StatusCode.OK
    finally:
        ma.down()
        mb.down()


def test_members_on_two_nodes_are_refused(pool: Pool, driver: DriverProcess, client: Client):
    """Node A cannot freeze or copy a volume in node B's pool: FAILED_PRECONDITION, nothing
    changed on either node."""
    other, teardown = make_pool(size=4 << 30)
    drv_b = DriverProcess(other, node_id="node-b")
    try:
        client_b = drv_b.start()
        try:
            a = client.create_volume("a", 64 * MiB, block_cap()).volume_id
            b = client_b.create_volume("b", 64 * MiB, block_cap()).volume_id
            before = (_state(pool, client), _state(other, client_b))
            for node in (client, client_b):
                stub = csi_pb2_grpc.GroupControllerStub(node.channel)
                code = status_code(
                    lambda stub=stub: stub.CreateVolumeGroupSnapshot(
                        csi_pb2.CreateVolumeGroupSnapshotRequest(
                            name="both", source_volume_ids=[a, b]
                        )
                    )
                )
                assert code is grpc.StatusCode.FAILED_PRECONDITION
            assert (_state(pool, client), _state(other, client_b)) == before
        finally:
            client_b.close()
    finally:
        drv_b.stop()
        teardown()


@pytest.mark.parametrize("crash", ["create-group:frozen", "create-group:images-ready"])
def test_killed_mid_group_leaves_no_half_group(pool: Pool, crash: str):
    """Killed while the members are frozen, or with every image made but nothing recorded:
    the restart thaws the filesystem and removes the images; the retry makes the whole group."""
    drv = DriverProcess(pool)
    drv.env = {"STOWAGE_FAULTS": crash}
    client = drv.start()
    vols = [client.create_volume(n, 128 * MiB, mount_cap("ext4")).volume_id for n in "xy"]
    mounted = [Mounted(client, pool.base, v, fs_type="ext4").up() for v in vols]
    try:
        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=vols)
        stub = csi_pb2_grpc.GroupControllerStub(client.channel)
        crashed = status_code(lambda: stub.CreateVolumeGroupSnapshot(req))
        assert crashed is grpc.StatusCode.UNAVAILABLE
        client.close()
        drv.stop()
        drv.env = {}
        client = drv.start()
        for m in mounted:
            m.client = client
            write_random(os.path.join(m.target, "after"), 1)  # thawed by start-up
        assert _state(pool, client) == ([], [])
        stub = csi_pb2_grpc.GroupControllerStub(client.channel)
        group = stub.CreateVolumeGroupSnapshot(req).group_snapshot
        assert len(group.snapshots) == 2
        assert len(_state(pool, client)[1]) == 2
    finally:
        for m in mounted:
            m.client = client
            m.down()
        client.close()
        drv.stop()


def test_a_store_rebuilt_from_the_records_keeps_the_group(pool: Pool):
    """meta.db lost: the start-up rebuild reads the members' records, which name their group,
    so the group answers as before and is still deleted whole."""
    drv = DriverProcess(pool)
    client = drv.start()
    try:
        vols = [client.create_volume(n, 64 * MiB, block_cap()).volume_id for n in "pq"]
        stub = csi_pb2_grpc.GroupControllerStub(client.channel)
        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="kept", source_volume_ids=vols)
        group = stub.CreateVolumeGroupSnapshot(req).group_snapshot
        client.close()
        assert drv.stop() == 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pool.mount, "meta.db" + suffix))
        client = drv.start()
        assert "rebuilt meta.db" in drv.log()
        stub = csi_pb2_grpc.GroupControllerStub(client.channel)
        got = stub.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        ).group_snapshot
        assert sorted(s.snapshot_id for s in got.snapshots) == sorted(
            s.snapshot_id for s in group.snapshots
        )
        assert stub.CreateVolumeGroupSnapshot(req).group_snapshot.group_snapshot_id == (
            group.group_snapshot_id
        )  # found by name again
        member = group.snapshots[0].snapshot_id
        assert status_code(lambda: client.delete_snapshot(member)) is (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        stub.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        )
        assert _state(pool, client) == ([], [])
    finally:
        client.close()
        drv.stop()
