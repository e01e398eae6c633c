"""Issue 15: a pool that cannot be lost by accident. Each scenario runs on a real loop-mounted
XFS pool with volumes holding data (staged and published, and unstaged), breaks something an
operator could break, checks what the operator is shown, recovers the way docs/operations.md
says, and ends with every volume's sha256 intact, `stowagectl check` clean and trash reclaimed
with grace 0 (the driver always runs with `--trash-grace 0` here: nothing claimed may go)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from csi_proto import csi_pb2
from driver import CONTEXT_POOL_UUID
from driver.ctl import local
from driver.ctl import pool as devpool
from driver.ctl.client import capability
from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from driver.records import RECORD_XATTR
from driver.storage import identity
from harness import REPO, wait_for
from tests.hardening.world import Placed, World, running_world
from tests.integration.helpers import MiB

BASE_ARGS = ("--pool-require-mountpoint", "--trash-grace", "0")


@dataclass
class Fleet:
    """What the test made: placed volumes, parked (written, then unstaged) ones, a snapshot."""

    placed: list[Placed] = field(default_factory=list)
    parked: dict[str, tuple[str, bool, str]] = field(default_factory=dict)  # id: (digest,…)
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    snapshot: str = ""


@pytest.fixture
def world() -> Iterator[World]:
    with running_world(*BASE_ARGS) as w:
        yield w


def populate(w: World) -> Fleet:
    fleet = Fleet()
    for name, block, fs in (("ext4", False, "ext4"), ("blk", True, ""), ("xfs", False, "xfs")):
        size = 320 * MiB if fs == "xfs" else 64 * MiB
        vol = w.client.create_volume(name, size, capability(block, fs))
        w.told_exist.add(vol.volume_id)
        fleet.contexts[vol.volume_id] = dict(vol.volume_context)
        assert vol.volume_context[CONTEXT_POOL_UUID] == pool_uuid(w)
        fleet.placed.append(w.place(vol.volume_id, block=block, fs=fs or "ext4"))
    parked = w.client.create_volume("parked", 64 * MiB, capability(False, "ext4"))
    w.told_exist.add(parked.volume_id)
    fleet.contexts[parked.volume_id] = dict(parked.volume_context)
    p = w.place(parked.volume_id, fs="ext4")
    w.unplace(p)
    fleet.parked[parked.volume_id] = (p.digest, False, "ext4")
    fleet.snapshot = w.client.create_snapshot("snap", fleet.placed[0].volume_id).snapshot_id
    w.told_exist.add(fleet.snapshot)
    return fleet


def pool_uuid(w: World) -> str:
    record = identity.read_identity(w.pool.mount)
    assert record is not None
    return record.uuid


def tree(root: str) -> dict[str, tuple[int, int, float]]:
    """Every path under root with mode, size and mtime: "touched nothing" means equal. Images
    of volumes still mounted are written by their filesystems (journal, atime), so their mtime
    is left out."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            path = os.path.join(d, n)
            st = os.lstat(path)
            live = os.path.basename(d) == "volumes" and n.endswith(".img")
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, 0 if live else st.st_mtime)
    return out


def stop(w: World) -> None:
    w.client.close()
    assert w.driver.stop() == 0, w.driver.log()


def start(w: World, *extra: str) -> None:
    w.driver.extra = [*BASE_ARGS, *extra]
    w.client = w.driver.start()


def refused(w: World, *extra: str) -> str:
    """Start the driver and expect it to refuse: exit 1 with one "cannot start" line, no
    socket left behind. Returns that line."""
    argv = [
        sys.executable,
        "-m",
        "driver",
        "--mode",
        "all",
        "--endpoint",
        w.driver.endpoint,
        "--pool-dir",
        w.pool.mount,
        "--node-id",
        w.driver.node_id,
        *BASE_ARGS,
        *extra,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "cannot start" in ln]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(w.driver.socket)
    return lines[0]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driver.ctl.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )


def replace(w: World, p: Placed, context: dict[str, str] | None = None) -> None:
    """Unpublish and unstage as kubelet would when the pod goes, then stage and publish again,
    and read the same bytes."""
    w.client.unpublish(p.volume_id, p.target)
    w.client.unstage(p.volume_id, p.staging)
    os.makedirs(p.staging, exist_ok=True)
    w.client.stage(p.volume_id, p.staging, p.cap, context)
    w.client.publish(p.volume_id, p.staging, p.target, p.cap, context=context)
    assert w.digest_of(p) == p.digest, f"data of {p.volume_id} changed"


def verify(w: World, fleet: Fleet) -> None:
    """Every volume's bytes, the snapshot, a clean check, then trash reclaimed with grace 0 and
    everything again."""
    for _ in range(2):
        for p in w.placed:
            assert w.digest_of(p) == p.digest, f"data of {p.volume_id} changed"
        for vid, (digest, block, fs) in fleet.parked.items():
            p = Placed(
                vid,
                os.path.join(w.pool.base, f"check-staging-{vid}"),
                os.path.join(w.pool.base, f"check-target-{vid}"),
                block,
                fs,
                digest,
            )
            os.makedirs(p.staging, exist_ok=True)
            w.client.stage(vid, p.staging, p.cap, fleet.contexts[vid])
            w.client.publish(vid, p.staging, p.target, p.cap, context=fleet.contexts[vid])
            try:
                assert w.digest_of(p) == digest, f"data of parked {vid} changed"
            finally:
                w.client.unpublish(vid, p.target)
                w.client.unstage(vid, p.staging)
        snaps = {e.snapshot.snapshot_id for e in w.client.list_snapshots()}
        assert fleet.snapshot in snaps
        w.check_invariants()
        assert local.gc_main(w.pool.mount, 0, dry_run=False) == 0


def drop_store(w: World) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(w.pool.mount, "meta.db" + suffix))


# --- the scenarios ----------------------------------------------------------------------------
def test_meta_db_deleted_is_rebuilt_from_the_images(world: World) -> None:
    fleet = populate(world)
    stop(world)
    drop_store(world)
    start(world)
    log = world.driver.log()
    assert "rebuilding" in log and "from the images' own records" in log
    listed = {e.volume.volume_id for e in world.client.list_volumes()}
    assert {p.volume_id for p in fleet.placed} | set(fleet.parked) <= listed
    # Filesystem volumes' staging and publication records came back from the mount table;
    # a block volume's staging path is not there: kubelet's next unpublish/unstage/stage
    # (here done by hand) records it again.
    for p in list(world.placed):
        if p.block:
            replace(world, p)
    verify(world, fleet)


@pytest.mark.parametrize("damage", ["another-pool", "truncated-garbage"])
def test_foreign_or_damaged_meta_db_is_refused_then_rebuilt(world: World, damage: str) -> None:
    fleet = populate(world)
    stop(world)
    db = os.path.join(world.pool.mount, "meta.db")
    if damage == "another-pool":
        other = os.path.join(world.pool.base, "other-pool")
        os.mkdir(other)
        from driver.core.rebuild import open_pool_dir

        opened = open_pool_dir(other)
        opened.close()
        drop_store(world)
        with open(os.path.join(other, "meta.db"), "rb") as src, open(db, "wb") as dst:
            dst.write(src.read())
        expect = "belongs to pool"
    else:
        size = os.path.getsize(db)
        with open(db, "r+b") as fh:
            fh.truncate(size // 2)
            fh.seek(size // 4)
            fh.write(os.urandom(8192))
        expect = "metadata store"
    before = tree(world.pool.mount)
    line = refused(world)
    assert expect in line and "pool rebuild" in line
    assert tree(world.pool.mount) == before, "a refused start changed the pool"
    checked = ctl("check", "--pool-dir", world.pool.mount)
    assert checked.returncode == 2, checked.stdout + checked.stderr  # could not check
    assert ctl("gc", "--pool-dir", world.pool.mount, "--older-than", "0").returncode == 2
    assert tree(world.pool.mount) == before
    rebuilt = ctl("pool", "rebuild", "--pool-dir", world.pool.mount)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "moved aside" in rebuilt.stdout
    aside = [n for n in os.listdir(world.pool.mount) if n.startswith("meta.db.damaged-")]
    assert aside, "the bad store must be kept"
    start(world)
    for p in list(world.placed):
        if p.block:
            replace(world, p)
    verify(world, fleet)


def test_pool_disk_not_mounted(world: World) -> None:
    """After a reboot the pool's disk did not mount: the pool directory is an empty directory
    on the root filesystem."""
    fleet = populate(world)
    old = pool_uuid(world)
    # reboot: the driver stops, every mount and loop device is gone, the disk stays unmounted
    world.client.close()
    world.driver.stop(signal.SIGKILL)
    os.unlink(world.driver.socket)  # the killed driver's; a refused start must not make one
    for entry in reversed(mountinfo.mounts_under(world.pool.base)):
        if entry.mount_point != world.pool.mount:
            subprocess.run(["umount", "--", entry.mount_point], check=True)
    loops = LoopManager(SubprocessRunner())
    for lo in loops.devices():
        if lo.backing_file.startswith(world.pool.mount + os.sep):
            loops.detach(lo.device)
    devpool.destroy(world.pool.image, world.pool.mount)
    assert os.listdir(world.pool.mount) == []
    # the chart's default: refused, nothing made
    line = refused(world)
    assert "not a mount point" in line
    assert os.listdir(world.pool.mount) == []
    # without the flag an empty directory becomes a new pool; volumes of the real one are
    # FAILED_PRECONDITION naming both pools, not NOT_FOUND
    start(world, "--no-pool-require-mountpoint")
    new = pool_uuid(world)
    assert new != old
    p = fleet.placed[0]
    for call in (
        lambda: world.client.stage(p.volume_id, p.staging, p.cap, fleet.contexts[p.volume_id]),
        lambda: world.client.publish(
            p.volume_id, p.staging, p.target, p.cap, context=fleet.contexts[p.volume_id]
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert old in (err.value.details() or "") and new in (err.value.details() or "")
    # recovery: stop, mount the disk, start; kubelet stages and publishes again
    stop(world)
    devpool.create(world.pool.image, world.pool.mount, 0, world.pool.fs_type)
    assert pool_uuid(world) == old
    start(world)
    for q in world.placed:
        os.makedirs(q.staging, exist_ok=True)
        world.client.stage(q.volume_id, q.staging, q.cap, fleet.contexts[q.volume_id])
        world.client.publish(
            q.volume_id, q.staging, q.target, q.cap, context=fleet.contexts[q.volume_id]
        )
    verify(world, fleet)


def test_pool_remounted_read_only(world: World) -> None:
    fleet = populate(world)
    # The kernel refuses to remount a filesystem read-only while files on it are open for
    # writing (images behind loop devices, meta.db): a running pool cannot go read-only under
    # the driver. It can once the volumes are unstaged and the driver stopped.
    for p in list(world.placed):
        parked = (p.digest, p.block, p.fs_type)
        world.unplace(p)
        fleet.parked[p.volume_id] = parked
    fleet.placed.clear()
    stop(world)
    subprocess.run(["mount", "-o", "remount,ro", world.pool.mount], check=True)
    try:
        before = tree(world.pool.mount)
        line = refused(world)
        assert "read-only" in line
        assert tree(world.pool.mount) == before
    finally:
        subprocess.run(["mount", "-o", "remount,rw", world.pool.mount], check=True)
    start(world)
    verify(world, fleet)


def test_image_deleted_by_hand_while_staged(world: World) -> None:
    fleet = populate(world)
    victims = [p for p in fleet.placed if p.fs_type == "ext4" or p.block]
    for p in victims:
        os.unlink(os.path.join(world.pool.mount, "volumes", p.volume_id + ".img"))
    # what the operator sees: abnormal conditions saying where the data is, check problems
    entries = {e.volume.volume_id: e for e in world.client.list_volumes()}
    for p in victims:
        cond = entries[p.volume_id].status.volume_condition
        assert cond.abnormal and "missing" in cond.message
        if not p.block:
            stats = world.client.stats(p.volume_id, p.target)
            assert stats.volume_condition.abnormal
            assert "NodeUnstageVolume writes the image back" in stats.volume_condition.message
    assert not world.check().ok
    # a restart (grace 0) keeps the volumes staged and their data in place
    stop(world)
    start(world)
    for p in victims:
        assert world.digest_of(p) == p.digest
    # recovery: the next unstage writes each image back from its loop device
    for p in victims:
        replace(world, p)
        assert os.path.exists(os.path.join(world.pool.mount, "volumes", p.volume_id + ".img"))
    verify(world, fleet)


def test_every_pool_file_is_owner_only_after_a_full_volume_life(world: World) -> None:
    """0600 files and 0700 directories from the moment they are made: walked before a restart
    (which would tighten older pools' modes and so hide a file made too open) and after."""
    fleet = populate(world)
    clone = world.client.create_volume(
        "clone", 64 * MiB, capability(False, "ext4"), volume=fleet.placed[0].volume_id
    )
    world.client.expand_volume(clone.volume_id, 128 * MiB)
    restored = world.client.create_volume(
        "restored", 64 * MiB, capability(False, "ext4"), snapshot=fleet.snapshot
    )
    world.client.delete_volume(restored.volume_id)
    backup = os.path.join(world.pool.mount, "meta.db.backup")
    wait_for(lambda: os.path.exists(backup), 30, "the store backup")
    walk_modes(world.pool.mount)
    stop(world)
    start(world)  # start-up writes the store backup, reconciles, recreates the reserve
    world.client.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    walk_modes(world.pool.mount)


def walk_modes(root: str) -> None:
    bad = []
    for d, dirs, files in os.walk(root):
        for n in dirs:
            mode = os.lstat(os.path.join(d, n)).st_mode & 0o777
            if mode != 0o700:
                bad.append(f"{os.path.join(d, n)} {mode:o}")
        for n in files:
            mode = os.lstat(os.path.join(d, n)).st_mode & 0o777
            if mode != 0o600:
                bad.append(f"{os.path.join(d, n)} {mode:o}")
    root_mode = os.stat(root).st_mode & 0o777
    assert root_mode == 0o700, f"pool directory is {root_mode:o}"
    names = {n for _, _, files in os.walk(root) for n in files}
    assert {"pool.json", "meta.db", ".meta-reserve", "meta.db.backup"} <= names
    assert any(n.startswith("s-") for n in names)
    assert not bad, "not owner-only:\n" + "\n".join(bad)


def test_pool_destroy_touches_only_what_it_owns(world: World) -> None:
    """`stowagectl pool destroy` refuses while a pool volume is mounted outside the pool (a
    staging or target path), and --dry-run lists its steps without taking them."""
    populate(world)
    staged = world.placed[0]
    with pytest.raises(Exception, match="still mounted outside"):
        devpool.destroy(world.pool.image, world.pool.mount, dry_run=True)
    dry = ctl(
        "pool", "destroy", "--image", world.pool.image, "--mount", world.pool.mount, "--dry-run"
    )
    assert dry.returncode == 2 and "still mounted outside" in dry.stderr
    assert mountinfo.top_mount_at(staged.staging) is not None  # nothing was unmounted
    world.tidy()
    stop(world)
    before = [e.mount_point for e in mountinfo.mounts_under(world.pool.base)]
    dry = ctl(
        "pool", "destroy", "--image", world.pool.image, "--mount", world.pool.mount, "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert f"would umount {world.pool.mount}" in dry.stdout
    assert [e.mount_point for e in mountinfo.mounts_under(world.pool.base)] == before
    start(world)


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs", "ext4"])
def test_records_on_each_pool_filesystem(fs_type: str) -> None:
    """User xattrs carry the records on every pool filesystem the driver accepts; a reflink
    (xfs, btrfs) or full copy (ext4) gets its own record, and the records rebuild the store."""
    with running_world(*BASE_ARGS, fs_type=fs_type, size=8 << 30) as w:
        vol = w.client.create_volume("v", 64 * MiB, capability(False, "ext4"))
        snap = w.client.create_snapshot("s", vol.volume_id).snapshot_id
        for kind, object_id in (("volumes", vol.volume_id), ("snapshots", snap)):
            path = os.path.join(w.pool.mount, kind, object_id + ".img")
            record = json.loads(os.getxattr(path, RECORD_XATTR))
            assert record["id"] == object_id and record["pool_uuid"] == pool_uuid(w)
        stop(w)
        drop_store(w)
        start(w)
        assert [e.volume.volume_id for e in w.client.list_volumes()] == [vol.volume_id]
        assert [e.snapshot.snapshot_id for e in w.client.list_snapshots()] == [snap]
