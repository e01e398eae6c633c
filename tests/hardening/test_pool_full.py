"""A pool filled to the brim (issue 7, part 4): every call that needs space is refused with
RESOURCE_EXHAUSTED and leaves nothing behind; writes into a thin volume that hit the full pool
fail loudly and show up as an abnormal volume condition; data written before is intact."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Iterator

import grpc
import pytest

from csi_proto import csi_pb2
from driver.ctl.client import mount_cap
from harness import Pool
from tests.hardening.world import World, running_world
from tests.integration.helpers import MiB, sha256


@pytest.fixture
def world() -> Iterator[World]:
    with running_world(size=512 * MiB) as w:
        yield w


def fill(pool: Pool) -> str:
    """Take every free block of the pool filesystem with a file outside the driver's folders."""
    path = os.path.join(pool.mount, "filler")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        st = os.statvfs(pool.mount)
        size = st.f_bavail * st.f_frsize
        while size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size -= 4 * MiB
        chunk = b"\xff" * 4096
        while True:  # the last blocks, one at a time
            try:
                os.pwrite(fd, chunk, os.fstat(fd).st_size)
                os.fsync(fd)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    break
                raise
    finally:
        os.close(fd)
    return path


def pool_state(pool: Pool) -> tuple[list[str], dict[str, int]]:
    files = sorted(
        f"{d}/{n}"
        for d in ("volumes", "snapshots", "trash")
        for n in os.listdir(os.path.join(pool.mount, d))
    )
    db = sqlite3.connect(f"file:{os.path.join(pool.mount, 'meta.db')}?mode=ro", uri=True)
    try:
        counts = {
            t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
            for t in ("volumes", "snapshots", "stagings", "publications", "journal")
        }
    finally:
        db.close()
    return files, counts


def test_full_pool_refuses_with_resource_exhausted_and_leaves_nothing(world: World) -> None:
    c = world.client
    vol = world.place(world.create("thin", 256 * MiB, fs="ext4"), mib=8)
    snap = c.create_snapshot("before-full", vol.volume_id).snapshot_id
    world.told_exist.add(snap)
    spare = world.create("spare", 64 * MiB)
    spare_snap = c.create_snapshot("spare-snap", vol.volume_id).snapshot_id
    reserve = os.path.join(world.pool.mount, ".meta-reserve")
    assert os.path.getsize(reserve) > 0
    filler = fill(world.pool)
    before = pool_state(world.pool)

    calls: dict[str, Callable[[], object]] = {
        "create": lambda: c.create_volume("new", 64 * MiB, mount_cap("ext4")),
        "create-preallocated": lambda: c.create_volume(
            "new-pre", 64 * MiB, mount_cap("ext4"), parameters={"preallocate": "true"}
        ),
        "snapshot": lambda: c.create_snapshot("after-full", vol.volume_id),
        "clone": lambda: c.create_volume(
            "clone", 256 * MiB, mount_cap("ext4"), volume=vol.volume_id
        ),
        "restore": lambda: c.create_volume("restore", 256 * MiB, mount_cap("ext4"), snapshot=snap),
        "expand": lambda: c.node_expand(vol.volume_id, vol.target, 1024 * MiB),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, err.value.details())
        assert pool_state(world.pool) == before, f"{what} left something behind"
    assert world.check().ok

    # Deleting is how an operator gets out of a full pool: it must work even though SQLite
    # needs free blocks to delete a row (the metadata reserve is given up for it).
    c.delete_volume(spare)
    world.told_deleted.add(spare)
    c.delete_snapshot(spare_snap)
    assert not os.path.exists(reserve)
    assert {e.volume.volume_id for e in c.list_volumes()} == {vol.volume_id}
    assert {e.snapshot.snapshot_id for e in c.list_snapshots()} == {snap}
    assert world.check().ok

    # A write into the thin volume's unallocated space cannot be stored: it must fail loudly.
    with pytest.raises(OSError) as failed:
        fd = os.open(os.path.join(vol.target, "overflow"), os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            for _ in range(64):
                os.write(fd, os.urandom(MiB))
            os.fsync(fd)
        finally:
            os.close(fd)
    assert failed.value.errno in (errno.EIO, errno.ENOSPC), failed.value
    stats = c.stats(vol.volume_id, vol.target)
    assert stats.volume_condition.abnormal, stats.volume_condition.message
    got = c.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id)
    )
    assert got.status.volume_condition.abnormal
    assert "pool is full" in got.status.volume_condition.message

    # Space back: the bytes written before the pool filled are intact after a fresh stage
    # (which runs fsck), and the condition clears.
    os.unlink(filler)
    world.unplace(vol)
    c.stage(vol.volume_id, vol.staging, vol.cap)
    c.publish(vol.volume_id, vol.staging, vol.target, vol.cap)
    world.placed.append(vol)
    assert sha256(os.path.join(vol.target, "data")) == vol.digest
    got = c.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id)
    )
    assert not got.status.volume_condition.abnormal, got.status.volume_condition.message
    c.delete_snapshot(snap)  # any delete with room to spare brings the reserve back
    assert os.path.getsize(reserve) > 0
    world.told_deleted.add(snap)
    world.check_invariants()
