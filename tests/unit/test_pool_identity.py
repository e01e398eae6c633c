"""Issue 15 in the unit tier: pool identity, image records, the store check, the rebuild,
reconciliation that adopts instead of trashing, the pool UUID in volume contexts, flags."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from driver import flags
from driver.cli import parse
from driver.core.controller import ControllerCore
from driver.core.modify import IoLimitsCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.core.rebuild import open_pool_dir, rebuild_pool_dir
from driver.core.reconcile import reconcile
from driver.errors import FailedPrecondition, Unavailable
from driver.model import AccessMode, AccessType, Capability, CapacityRange, MiB
from driver.records import RECORD_XATTR, ImageRecord, PoolRecord, RecordError
from driver.storage import identity
from driver.storage.image import ImagePool
from driver.storage.store import Store, StoreDamaged, verify
from harness import REPO
from tests.unit.conftest import build_ctx
from tests.unit.fakes import FakeHost

RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def _tree(root: str) -> dict[str, tuple[int, int]]:
    """Every path under root with (mode, size): what "touching nothing" must leave equal."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_mode, st.st_size)
    return out


# --- records ------------------------------------------------------------------------------------
def test_image_record_round_trip_and_refusals(controller: ControllerCore) -> None:
    v = controller.create_volume("r", [RW], CapacityRange(MiB), {"preallocate": "false"}, None)
    rec = ImageRecord.of_volume(v, "u")
    assert ImageRecord.from_json(rec.to_json()) == rec
    assert rec.volume() == v
    data = json.loads(rec.to_json())
    for broken in (
        {**data, "format": 2},
        {**data, "kind": "disk"},
        {**data, "id": "../etc"},
        {**data, "size": "1"},
        {**data, "formatted": 1},
        {**data, "sector_size": 100},
        {**data, "parameters": {"a": 1}},
        {**data, "fs_type": "vfat"},
    ):
        with pytest.raises(RecordError):
            ImageRecord.from_json(json.dumps(broken))
    block = ImageRecord.from_json(json.dumps({**data, "access_type": "block", "fs_type": ""}))
    assert block.volume().fs_type is None
    with pytest.raises(RecordError):
        ImageRecord.from_json(b"\xff\x00")
    with pytest.raises(RecordError):
        PoolRecord.from_json('{"format": 1, "uuid": "nope", "created_at": 1}')


def test_every_image_carries_its_record_before_its_row(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = controller.create_volume("a", [RW], CapacityRange(MiB), {}, None)
    s = controller.create_snapshot("s", v.id, {})
    c = controller.create_volume("c", [RW], CapacityRange(MiB), {}, ctx_source(s.id))
    for object_id, name in ((v.id, "a"), (s.id, "s"), (c.id, "c")):
        rec = ctx.backend.read_record(object_id)
        assert rec is not None and rec.id == object_id and rec.name == name
    snap_rec = ctx.backend.read_record(s.id)
    assert snap_rec is not None and snap_rec.kind == "snapshot" and snap_rec.source_id == v.id
    ctx.backend.expand(v.id, 8 * MiB)  # NodeExpandVolume grows the image through this
    grown = ctx.backend.read_record(v.id)
    assert grown is not None and grown.size == 8 * MiB  # rewritten on expansion


def ctx_source(snapshot_id: str):  # type: ignore[no-untyped-def]
    from driver.model import ContentSource

    return ContentSource("snapshot", snapshot_id)


# --- identity -------------------------------------------------------------------------------
def test_empty_dir_becomes_a_pool_with_owner_only_modes(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.makedirs(os.path.join(root, "lost+found"))
    made = identity.open_identity(root)
    assert made.how == "created"
    path = os.path.join(root, "pool.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(root).st_mode & 0o777 == 0o700
    assert identity.open_identity(root) == identity.Identity(made.record, "existing")


def test_non_empty_dir_that_is_not_a_pool_is_refused_untouched(
    tmp_path: os.PathLike[str],
) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.makedirs(os.path.join(root, "volumes"))
    with open(os.path.join(root, "notes.txt"), "w") as fh:
        fh.write("someone's files")
    before = _tree(root)
    with pytest.raises(FailedPrecondition, match="not a Stowage pool"):
        identity.open_identity(root)
    with pytest.raises(FailedPrecondition, match="not a Stowage pool"):
        open_pool_dir(root)
    assert _tree(root) == before


def test_pre_identity_pool_is_adopted_once(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    Store(os.path.join(root, "meta.db")).close()
    adopted = identity.open_identity(root)
    assert adopted.how == "adopted"
    assert identity.open_identity(root).uuid == adopted.uuid


def test_require_mountpoint_refuses_a_plain_directory(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    with pytest.raises(FailedPrecondition, match="not a mount point"):
        identity.open_identity(root, require_mountpoint=True)
    assert os.listdir(root) == []
    with pytest.raises(Unavailable, match="does not exist"):
        identity.open_identity(os.path.join(root, "missing"))


def test_a_pool_is_held_by_one_process(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    opened = open_pool_dir(root)
    try:
        with pytest.raises(FailedPrecondition, match="in use"):
            rebuild_pool_dir(root)
    finally:
        opened.close()


# --- the store ------------------------------------------------------------------------------
def test_damaged_or_foreign_store_is_refused_untouched(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    opened = open_pool_dir(root)
    uuid = opened.identity.uuid
    opened.close()
    db = os.path.join(root, "meta.db")
    verify(db, uuid)
    with pytest.raises(StoreDamaged, match="belongs to pool"):
        verify(db, "another")
    with open(db, "rb") as fh:
        raw = fh.read()
    for damage in (raw[: len(raw) // 2] + b"\x00" * 10, b"garbage" * 1000, raw[:100]):
        with open(db, "wb") as fh:
            fh.write(damage)
        before = _tree(root)
        with pytest.raises(StoreDamaged, match="pool rebuild"):
            open_pool_dir(root)
        assert _tree(root) == before


def test_store_files_are_owner_only(tmp_path: os.PathLike[str]) -> None:
    s = Store(os.path.join(str(tmp_path), "m.db"))
    s.journal_begin("x", "y", {})
    for suffix in ("", "-wal", "-shm"):
        assert os.stat(s.path + suffix).st_mode & 0o777 == 0o600, suffix
    s.backup_to(s.path + ".backup")
    assert os.stat(s.path + ".backup").st_mode & 0o777 == 0o600
    s.close()


# --- rebuild and reconciliation -------------------------------------------------------------
def _pool_with_volumes(host: FakeHost, root: str) -> tuple[PoolContext, list[str]]:
    opened = open_pool_dir(root)
    ctx = build_ctx(host, opened.store, opened.backend, pool_uuid=opened.identity.uuid)
    c = ControllerCore(ctx)
    # I/O limits given at creation (v0) and by ModifyVolume (v1) are in the records too.
    limit = {"stowage.csi.io/read-iops": "100"}
    vols = [
        c.create_volume(f"v{i}", [RW], CapacityRange(MiB), {}, None, mutable=limit if i else {})
        .id
        for i in range(3)
    ]
    IoLimitsCore(ctx).modify(vols[0], {"stowage.csi.io/write-bps": "1Mi"})
    snap = c.create_snapshot("snap", vols[0], {}).id
    os.close(opened.lock_fd)
    return ctx, [*vols, snap]


def test_missing_store_is_rebuilt_from_records(host: FakeHost, tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    ctx, made = _pool_with_volumes(host, root)
    before = {v.id: v for v in ctx.store.list_volumes()}
    assert all(v.mutable_parameters for v in before.values())
    ctx.store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(os.path.join(root, "meta.db" + suffix)):
            os.unlink(os.path.join(root, "meta.db" + suffix))
    opened = open_pool_dir(root)
    try:
        assert opened.rebuilt is not None and sorted(
            opened.rebuilt.volumes + opened.rebuilt.snapshots
        ) == sorted(made)
        assert {v.id: v for v in opened.store.list_volumes()} == before
    finally:
        opened.close()


def test_rebuild_moves_a_damaged_store_aside(host: FakeHost, tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    ctx, made = _pool_with_volumes(host, root)
    ctx.store.close()
    with open(os.path.join(root, "meta.db"), "wb") as fh:
        fh.write(b"garbage" * 1000)
    report = rebuild_pool_dir(root)
    assert sorted(report.volumes + report.snapshots) == sorted(made)
    (aside,) = report.moved_aside
    with open(aside, "rb") as fh:
        assert fh.read() == b"garbage" * 1000  # kept, never deleted
    opened = open_pool_dir(root)
    try:
        assert len(opened.store.list_volumes()) == 3
    finally:
        opened.close()


def test_reconcile_adopts_described_images_and_spares_conflicts(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = controller.create_volume("kept", [RW], CapacityRange(MiB), {}, None)
    w = controller.create_volume("lost-row", [RW], CapacityRange(MiB), {}, None)
    ctx.store.remove_volume(w.id)  # the row is gone, the image describes itself
    report = reconcile(ctx)
    assert report.adopted == [w.id] and report.trashed == []
    assert ctx.store.get_volume(w.id) == w
    # an image whose record names a volume already in the store is left alone and reported
    dup = dataclasses.replace(ImageRecord.of_volume(v, ""), id="v-" + "9" * 32)
    ctx.backend.create(dup.id, MiB, record=dup)
    report = reconcile(ctx, trash_grace=0)
    assert ctx.backend.volume_size(dup.id) == MiB
    assert any("which " + v.id + " holds" in p for p in report.problems())
    # an unreadable record: left in place, reported, never trashed
    os.setxattr(ctx.backend.image_path(dup.id), RECORD_XATTR, b"{broken")
    report = reconcile(ctx, trash_grace=0)
    assert ctx.backend.volume_size(dup.id) == MiB
    assert any("unreadable record" in p for p in report.problems())


def test_rows_without_records_get_them_at_start(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = controller.create_volume("old", [RW], CapacityRange(MiB), {}, None)
    os.removexattr(ctx.backend.image_path(v.id), RECORD_XATTR)  # a pre-record image
    assert reconcile(ctx).described == [v.id]
    assert ctx.backend.read_record(v.id) == ImageRecord.of_volume(v, ctx.pool_uuid)


# --- pool UUID in the volume context --------------------------------------------------------
def test_node_refuses_a_volume_of_another_pool(
    host: FakeHost, store: Store, pool_dir: str, kubelet: str
) -> None:
    ctx = build_ctx(host, store, ImagePool(pool_dir), pool_uuid="this-pool")
    v = ControllerCore(ctx).create_volume("v", [RW], CapacityRange(MiB), {}, None)
    node = NodeCore(ctx)
    staging = os.path.join(kubelet, "s")
    os.mkdir(staging)
    with pytest.raises(FailedPrecondition, match=r"belongs to pool other-pool.*is this-pool"):
        node.stage(v.id, staging, RW, "other-pool")
    with pytest.raises(FailedPrecondition, match="other-pool"):
        node.publish(v.id, staging, os.path.join(kubelet, "t"), RW, False, "other-pool")
    node.stage(v.id, staging, RW, "")  # volumes made before identities keep working
    node.stage(v.id, staging, RW, "this-pool")


# --- flags ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90", 90), ("90s", 90), ("15m", 900), ("7d", 604800), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert flags.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1s", "7x", "1d 2h", "d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        flags.duration(text)


def test_flags_parse() -> None:
    cfg = parse(["--trash-grace", "7d", "--pool-require-mountpoint", "--metrics-address", ":9"])
    assert cfg.trash_grace == 604800 and cfg.pool_require_mountpoint
    assert cfg.backup_verify_interval == 0  # off unless asked
    assert parse(["--backup-verify-interval", "1d"]).backup_verify_interval == 86400


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("1s", 1.0), ("24h", 86400.0)])
def test_interval_is_off_or_long_enough(text: str, seconds: float) -> None:
    assert flags.interval(text, minimum=1.0) == seconds


@pytest.mark.parametrize("text", ["0.5s", "often", ""])
def test_bad_intervals(text: str) -> None:
    with pytest.raises(ValueError, match=r"too short|duration"):
        flags.interval(text, minimum=1.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--trash-grace", "a week"],
        ["--metrics-address", "localhost"],
        ["--metrics-address", "host:99999"],
        ["--endpoint", "/run/csi.sock"],
        ["--endpoint", "unix://relative.sock"],
        ["--workers", "0"],
        ["--store-backup-interval", "often"],
        ["--backup-verify-interval", "daily"],
        ["--backup-verify-interval", "0.5s"],
    ],
)
def test_bad_flag_is_one_line_and_exit_2_before_the_pool_opens(
    argv: list[str], tmp_path: os.PathLike[str]
) -> None:
    pool = os.path.join(str(tmp_path), "pool")
    sock = os.path.join(str(tmp_path), "csi.sock")
    os.mkdir(pool)
    endpoint = [] if "--endpoint" in argv else ["--endpoint", "unix://" + sock]
    proc = subprocess.run(
        [sys.executable, "-m", "driver", "--pool-dir", pool, *endpoint, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("stowage-csi: error: ")
    assert os.listdir(pool) == [] and not os.path.exists(sock)


def test_lost_pool_json_keeps_the_pools_uuid(host: FakeHost, tmp_path: os.PathLike[str]) -> None:
    """pool.json deleted: a store that names its pool, or the images' records, give the same
    UUID back (volume contexts carry it), never a new one."""
    root = os.path.join(str(tmp_path), "p")
    os.mkdir(root)
    ctx, _made = _pool_with_volumes(host, root)
    uuid = ctx.pool_uuid
    ctx.store.close()
    os.unlink(os.path.join(root, "pool.json"))
    assert identity.open_identity(root).uuid == uuid  # from meta.db
    os.unlink(os.path.join(root, "pool.json"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(os.path.join(root, "meta.db" + suffix)):
            os.unlink(os.path.join(root, "meta.db" + suffix))
    with pytest.raises(FailedPrecondition, match="not a Stowage pool"):
        identity.open_identity(root)  # images but neither file: refused
    report = rebuild_pool_dir(root)  # the records name the pool: pool.json written again
    assert len(report.volumes) == 3
    assert identity.open_identity(root).uuid == uuid


def test_snapshot_record_feeds_the_backup_manifest(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    """One schema: the fields a backup manifest shares with a snapshot's own record come from
    the record, under the manifest's names."""
    from driver.backup.engine import SnapshotRecord

    v = controller.create_volume("src", [RW], CapacityRange(MiB), {}, None)
    s = controller.create_snapshot("snap", v.id, {})
    rec = ctx.backend.read_record(s.id)
    assert rec is not None
    made = SnapshotRecord(**rec.manifest_fields())
    assert (made.snapshot_id, made.source_volume_id, made.name) == (s.id, v.id, "snap")
    assert made.sector_size == s.sector_size and made.created and made.created.endswith("Z")
    with pytest.raises(RecordError):
        ImageRecord.of_volume(v, "").manifest_fields()
