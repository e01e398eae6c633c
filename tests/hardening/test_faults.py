"""Crash at every fault point of every mutating operation, restart, retry as the CO would, and
check that nothing was lost (issue 7, part 2).

Each case: a driver on a fresh pool with a *witness* — an ext4 volume staged, published and
holding random bytes — plus whatever the operation needs. The driver is restarted with
STOWAGE_FAULTS naming one point, the operation is called and must kill the driver there (exit by
SIGKILL, log line), the driver is started again (reconciliation runs before it is ready), the
same call is retried and must succeed, and then the invariants hold: `stowagectl check` finds
nothing, every object the CO was told exists exists, nothing deleted is left outside trash, the
witness's bytes are unchanged and its filesystem takes writes (not left frozen), every placed
volume has exactly one loop device, and the operation's own result is right.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from csi_proto import csi_pb2, csi_pb2_grpc
from driver import faults
from driver.ctl.client import mount_cap
from driver.host import mountinfo
from tests.hardening.world import Placed, World, assert_writable, loops_of, running_world
from tests.integration.helpers import MiB, sha256, write_random


@dataclass
class Scenario:
    """setup → (crash inside act) → act again → verify."""

    setup: Callable[[World], dict[str, object]]
    act: Callable[[World, dict[str, object]], None]
    verify: Callable[[World, dict[str, object]], None]


def _witness(w: World) -> Placed:
    return w.place(w.create("witness"), fs="ext4")


# --- scenarios --------------------------------------------------------------------------------
def _create_setup(w: World) -> dict[str, object]:
    return {"witness": _witness(w)}


def _create_act(w: World, s: dict[str, object]) -> None:
    s["id"] = w.client.create_volume("subject", 64 * MiB, mount_cap("ext4")).volume_id


def _create_verify(w: World, s: dict[str, object]) -> None:
    named = [e.volume for e in w.client.list_volumes() if e.volume.volume_id == s["id"]]
    assert len(named) == 1 and named[0].capacity_bytes >= 64 * MiB
    p = w.place(str(s["id"]))  # usable: stages, formats, mounts, takes data
    assert w.digest_of(p) == p.digest
    w.told_exist.add(str(s["id"]))


def _restore_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    snap = w.client.create_snapshot("snap", wit.volume_id).snapshot_id
    w.told_exist.add(snap)
    return {"witness": wit, "snap": snap, "digest": wit.digest}


def _restore_act(w: World, s: dict[str, object]) -> None:
    s["id"] = w.client.create_volume(
        "restored", 64 * MiB, mount_cap("ext4"), snapshot=str(s["snap"])
    ).volume_id


def _copy_verify(w: World, s: dict[str, object]) -> None:
    vid = str(s["id"])
    w.told_exist.add(vid)
    p = Placed(
        vid,
        os.path.join(w.pool.base, "staging-copy"),
        os.path.join(w.pool.base, "target-copy"),
        False,
        "ext4",
        str(s["digest"]),
    )
    os.makedirs(p.staging, exist_ok=True)
    w.client.stage(vid, p.staging, p.cap)
    w.client.publish(vid, p.staging, p.target, p.cap)
    w.placed.append(p)  # its bytes are compared with the source's by check_invariants


def _clone_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    return {"witness": wit, "digest": wit.digest}


def _clone_act(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    s["id"] = w.client.create_volume(
        "cloned", 64 * MiB, mount_cap("ext4"), volume=wit.volume_id
    ).volume_id


def _delete_setup(w: World) -> dict[str, object]:
    _witness(w)
    return {"victim": w.create("victim")}


def _delete_act(w: World, s: dict[str, object]) -> None:
    w.client.delete_volume(str(s["victim"]))
    w.told_deleted.add(str(s["victim"]))


def _delete_verify(w: World, s: dict[str, object]) -> None:
    assert str(s["victim"]) not in {e.volume.volume_id for e in w.client.list_volumes()}


def _snap_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    return {"witness": wit, "digest": wit.digest}


def _snap_act(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    s["snap"] = w.client.create_snapshot("snap", wit.volume_id).snapshot_id


def _snap_verify(w: World, s: dict[str, object]) -> None:
    snaps = [e.snapshot for e in w.client.list_snapshots()]
    assert [x.snapshot_id for x in snaps] == [s["snap"]] and snaps[0].ready_to_use
    w.told_exist.add(str(s["snap"]))
    s["id"] = w.client.create_volume(
        "from-snap", 64 * MiB, mount_cap("ext4"), snapshot=str(s["snap"])
    ).volume_id
    _copy_verify(w, s)


def _delsnap_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    snap = w.client.create_snapshot("doomed", wit.volume_id).snapshot_id
    w.told_exist.add(snap)
    return {"snap": snap}


def _delsnap_act(w: World, s: dict[str, object]) -> None:
    w.client.delete_snapshot(str(s["snap"]))
    w.told_deleted.add(str(s["snap"]))


def _delsnap_verify(w: World, s: dict[str, object]) -> None:
    assert not w.client.list_snapshots()


def _groups(w: World) -> csi_pb2_grpc.GroupControllerStub:
    return csi_pb2_grpc.GroupControllerStub(w.client.channel)


def _group_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    other = w.place(w.create("member", fs="xfs", size=320 * MiB), fs="xfs")
    return {"witness": wit, "digest": wit.digest, "members": [wit.volume_id, other.volume_id]}


def _group_act(w: World, s: dict[str, object]) -> None:
    members = s["members"]
    assert isinstance(members, list)
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=members)
    s["group"] = _groups(w).CreateVolumeGroupSnapshot(req).group_snapshot


def _group_verify(w: World, s: dict[str, object]) -> None:
    """The whole group or, before the retry, nothing: exactly its two snapshots exist."""
    group = s["group"]
    assert isinstance(group, csi_pb2.VolumeGroupSnapshot)
    ids = sorted(x.snapshot_id for x in group.snapshots)
    assert sorted(e.snapshot.snapshot_id for e in w.client.list_snapshots()) == ids
    assert len(ids) == 2 and group.ready_to_use
    w.told_exist.update(ids)
    wit = _witness_in(s)
    snap = next(x.snapshot_id for x in group.snapshots if x.source_volume_id == wit.volume_id)
    s["id"] = w.client.create_volume(
        "from-group", 64 * MiB, mount_cap("ext4"), snapshot=snap
    ).volume_id
    _copy_verify(w, s)


def _delgroup_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="doomed", source_volume_ids=[wit.volume_id])
    group = _groups(w).CreateVolumeGroupSnapshot(req).group_snapshot
    w.told_exist.update(x.snapshot_id for x in group.snapshots)
    return {"group": group}


def _delgroup_act(w: World, s: dict[str, object]) -> None:
    group = s["group"]
    assert isinstance(group, csi_pb2.VolumeGroupSnapshot)
    ids = [x.snapshot_id for x in group.snapshots]
    _groups(w).DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
        )
    )
    w.told_deleted.update(ids)


def _delgroup_verify(w: World, s: dict[str, object]) -> None:
    group = s["group"]
    assert isinstance(group, csi_pb2.VolumeGroupSnapshot)
    assert not w.client.list_snapshots()
    with pytest.raises(grpc.RpcError) as gone:
        _groups(w).GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        )
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND


def _node_expand_setup(w: World) -> dict[str, object]:
    # xfs: online growth needs no capability the sandbox may lack (ext4 needs CAP_SYS_RESOURCE).
    return {"witness": w.place(w.create("witness", 320 * MiB, fs="xfs"), fs="xfs")}


def _node_expand_act(w: World, s: dict[str, object]) -> None:
    """As csi-resizer and the kubelet do it: ControllerExpandVolume (the code controller mode
    serves, answered from the request) says the size, NodeExpandVolume grows the volume."""
    wit = _witness_in(s)
    s["size"] = w.client.expand_volume(wit.volume_id, 640 * MiB)
    assert w.client.node_expand(wit.volume_id, wit.target, int(str(s["size"]))) == s["size"]


def _node_expand_verify(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    assert s["size"] == 640 * MiB
    vol = next(e.volume for e in w.client.list_volumes() if e.volume.volume_id == wit.volume_id)
    assert vol.capacity_bytes == s["size"]  # recorded, journal rolled or closed
    image = os.path.join(w.pool.mount, "volumes", wit.volume_id + ".img")
    assert os.path.getsize(image) == vol.capacity_bytes
    st = os.statvfs(wit.target)
    assert st.f_blocks * st.f_frsize > 500 * MiB


def _fresh_setup(w: World) -> dict[str, object]:
    _witness(w)
    vid = w.create("subject", fs="ext4")
    staging = os.path.join(w.pool.base, "staging-subject")
    os.makedirs(staging, exist_ok=True)
    return {"id": vid, "staging": staging, "target": os.path.join(w.pool.base, "target-subject")}


def _stage_act(w: World, s: dict[str, object]) -> None:
    w.client.stage(str(s["id"]), str(s["staging"]), mount_cap("ext4"))


def _stage_verify(w: World, s: dict[str, object]) -> None:
    vid, staging = str(s["id"]), str(s["staging"])
    loops = loops_of(w.pool, vid)
    assert len(loops) == 1
    top = mountinfo.top_mount_at(staging)
    assert top is not None and mountinfo.is_on(top, loops[0])
    assert_writable(staging)
    _publish_act(w, s)
    _adopt(w, s)


def _adopt(w: World, s: dict[str, object]) -> None:
    """Hand a staged and published subject to the invariant checks, with fresh data in it."""
    p = Placed(str(s["id"]), str(s["staging"]), str(s["target"]), False, "ext4")
    p.digest = write_random(p.data, 2)
    w.placed.append(p)


def _publish_setup(w: World) -> dict[str, object]:
    s = _fresh_setup(w)
    w.client.stage(str(s["id"]), str(s["staging"]), mount_cap("ext4"))
    return s


def _publish_act(w: World, s: dict[str, object]) -> None:
    w.client.publish(str(s["id"]), str(s["staging"]), str(s["target"]), mount_cap("ext4"))


def _publish_verify(w: World, s: dict[str, object]) -> None:
    vid, target = str(s["id"]), str(s["target"])
    top = mountinfo.top_mount_at(target)
    assert top is not None and mountinfo.is_on(top, loops_of(w.pool, vid)[0])
    assert_writable(target)
    _adopt(w, s)


def _witness_in(s: dict[str, object]) -> Placed:
    wit = s["witness"]
    assert isinstance(wit, Placed)
    return wit


def _unpublish_setup(w: World) -> dict[str, object]:
    wit = _witness(w)
    w.placed.remove(wit)  # the operation takes it down; its data is checked below
    return {"witness": wit}


def _unpublish_act(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    w.client.unpublish(wit.volume_id, wit.target)


def _unpublish_verify(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    assert mountinfo.top_mount_at(wit.target) is None
    # The target is removed with its publication record. A crash right after the unmount
    # leaves an empty directory the restart can no longer tie to a publication; the driver
    # then leaves it alone and kubelet removes its own empty directories.
    assert not os.path.exists(wit.target) or os.listdir(wit.target) == []
    assert sha256(os.path.join(wit.staging, "data")) == wit.digest
    w.client.publish(wit.volume_id, wit.staging, wit.target, wit.cap)
    w.placed.append(wit)


def _unstage_setup(w: World) -> dict[str, object]:
    s = _unpublish_setup(w)
    wit = _witness_in(s)
    w.client.unpublish(wit.volume_id, wit.target)
    return s


def _unstage_act(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    w.client.unstage(wit.volume_id, wit.staging)


def _unstage_verify(w: World, s: dict[str, object]) -> None:
    wit = _witness_in(s)
    assert not loops_of(w.pool, wit.volume_id)
    assert mountinfo.top_mount_at(wit.staging) is None
    w.client.stage(wit.volume_id, wit.staging, wit.cap)  # stage again: the old bytes are there
    w.client.publish(wit.volume_id, wit.staging, wit.target, wit.cap)
    w.placed.append(wit)


SCENARIOS: dict[str, Scenario] = {
    "create-volume": Scenario(_create_setup, _create_act, _create_verify),
    "restore-volume": Scenario(_restore_setup, _restore_act, _copy_verify),
    "clone-volume": Scenario(_clone_setup, _clone_act, _copy_verify),
    "delete-volume": Scenario(_delete_setup, _delete_act, _delete_verify),
    "create-snapshot": Scenario(_snap_setup, _snap_act, _snap_verify),
    "delete-snapshot": Scenario(_delsnap_setup, _delsnap_act, _delsnap_verify),
    "create-group": Scenario(_group_setup, _group_act, _group_verify),
    "delete-group": Scenario(_delgroup_setup, _delgroup_act, _delgroup_verify),
    "node-expand": Scenario(_node_expand_setup, _node_expand_act, _node_expand_verify),
    "stage": Scenario(_fresh_setup, _stage_act, _stage_verify),
    "publish": Scenario(_publish_setup, _publish_act, _publish_verify),
    "unpublish": Scenario(_unpublish_setup, _unpublish_act, _unpublish_verify),
    "unstage": Scenario(_unstage_setup, _unstage_act, _unstage_verify),
}

CASES = [(op, point) for op, points in faults.OPERATIONS.items() for point in points]


def test_every_operation_with_fault_points_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(faults.OPERATIONS)
    assert len(CASES) >= 40


@pytest.fixture
def world() -> Iterator[World]:
    with running_world() as w:
        yield w


@pytest.mark.parametrize(("op", "point"), CASES, ids=[f"{o}/{p}" for o, p in CASES])
def test_crash_at_fault_point_then_retry(world: World, op: str, point: str) -> None:
    sc = SCENARIOS[op]
    state = sc.setup(world)
    world.restart(faults=point)
    with pytest.raises(Exception) as crashed:  # the connection drops under the call
        sc.act(world, state)
    assert "UNAVAILABLE" in str(crashed.value) or "CANCELLED" in str(crashed.value)
    world.expect_crash(point)
    sc.act(world, state)  # the CO's retry, against the restarted driver
    sc.verify(world, state)
    world.check_invariants()
    world.tidy()
