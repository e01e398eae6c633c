"""Opening a pool directory, and rebuilding its metadata store from the images alone.

`open_pool_dir` is what the driver does at start-up, in this order, touching nothing until each
check has passed:

1. the directory's identity (`driver.storage.identity`): an existing pool, a new pool in an
   empty directory, an adopted pre-identity pool, or a refusal;
2. the pool is held (flock) so that no second driver or rebuild uses it at once;
3. the image pool (directories, reflink and xattr probes);
4. the store: a missing (or empty) `meta.db` next to images with records is rebuilt from them,
   loudly; a damaged one or another pool's is refused (`StoreDamaged`) and left as found.

`rebuild_store` (also `stowagectl pool rebuild`) reads every image's own record and writes a new
`meta.db` beside the old one, then moves the old one (and its -wal/-shm) aside under
`meta.db.damaged-<time>` — it never deletes it — and renames the new one into place. Staging and
publication records are not in the images: start-up reconciliation finds them again in the
mount table (`reconcile.adopt_mounts`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from driver.errors import FailedPrecondition, StowageError
from driver.model import Snapshot, Volume
from driver.records import PoolRecord, RecordError
from driver.storage import identity
from driver.storage.image import ImagePool
from driver.storage.store import Store, verify

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    volumes: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)  # images without a record: left alone
    unreadable: list[str] = field(default_factory=list)  # records that cannot be read
    foreign: list[str] = field(default_factory=list)  # records naming another pool
    duplicates: list[str] = field(default_factory=list)  # a name claimed twice: older kept
    moved_aside: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"rebuilt meta.db from {len(self.volumes)} volume and {len(self.snapshots)} "
            f"snapshot record(s) in {self.seconds:.2f} s"
        ]
        out += [f"moved aside {p}" for p in self.moved_aside]
        out += [f"image {p} has no record; left in place, not in meta.db" for p in self.unrecorded]
        out += [f"unreadable record: {p}; left in place" for p in self.unreadable]
        out += [f"record of another pool: {p}; left in place" for p in self.foreign]
        out += [f"name claimed twice: {p}; left in place" for p in self.duplicates]
        return out

    @property
    def problems(self) -> int:
        return (
            len(self.unrecorded) + len(self.unreadable) + len(self.foreign) + len(self.duplicates)
        )


def _scan(
    backend: ImagePool, report: RebuildReport
) -> tuple[list[Volume], list[Snapshot], dict[str, tuple[str, float]]]:
    """Rows from the records: volumes, snapshots, and the groups their members name (group
    ID -> name, creation time)."""
    volumes: list[Volume] = []
    snapshots: list[Snapshot] = []
    groups: dict[str, tuple[str, float]] = {}
    names: dict[tuple[str, str], str] = {}
    found = [(vid, "volume") for vid in backend.volume_ids()] + [
        (sid, "snapshot") for sid in backend.snapshot_ids()
    ]
    records = []
    for object_id, kind in found:
        path = (
            backend.image_path(object_id) if kind == "volume" else backend.snapshot_path(object_id)
        )
        try:
            rec = backend.read_record(object_id)
        except RecordError as exc:
            report.unreadable.append(f"{path}: {exc}")
            continue
        if rec is None:
            report.unrecorded.append(path)
            continue
        if rec.pool_uuid and backend.pool_uuid and rec.pool_uuid != backend.pool_uuid:
            report.foreign.append(f"{path} (pool {rec.pool_uuid})")
            continue
        records.append(rec)
    for rec in sorted(records, key=lambda r: (r.created_at, r.id)):
        key = (rec.kind, rec.name)
        if key in names:
            report.duplicates.append(f"{rec.kind} {rec.id} ({rec.name!r}, also {names[key]})")
            continue
        names[key] = rec.id
        if rec.kind == "volume":
            volumes.append(rec.volume())
        else:
            snapshots.append(rec.snapshot())
            if rec.group is not None:
                gid, gname = rec.group
                groups.setdefault(gid, (gname, rec.created_at))
    return volumes, snapshots, groups


def rebuild_store(backend: ImagePool, pool_uuid: str) -> RebuildReport:
    """A new meta.db from the images' records; the old files are moved aside, never deleted.
    The caller holds the pool (identity.hold)."""
    start = time.monotonic()
    report = RebuildReport()
    root = backend.root
    final = os.path.join(root, identity.META_DB)
    fresh = final + ".rebuild"
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fresh + suffix)  # ours: a rebuild that did not finish
    volumes, snapshots, groups = _scan(backend, report)
    store = Store(fresh, pool_uuid=pool_uuid)
    try:
        store.import_rows(volumes, snapshots, groups)
    finally:
        store.close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(fresh + suffix):  # closing the last connection checkpoints and removes
            os.unlink(fresh + suffix)
    fd = os.open(fresh, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for suffix in ("", "-wal", "-shm"):
        old = final + suffix
        if os.path.exists(old):
            aside = f"{final}.damaged-{stamp}{suffix}"
            os.rename(old, aside)
            report.moved_aside.append(aside)
    os.rename(fresh, final)
    identity.fsync_dir(root)
    report.volumes = [v.id for v in volumes]
    report.snapshots = [s.id for s in snapshots]
    report.seconds = time.monotonic() - start
    return report


@dataclass
class OpenedPool:
    identity: identity.Identity
    backend: ImagePool
    store: Store
    lock_fd: int
    rebuilt: RebuildReport | None = None

    def close(self) -> None:
        self.store.close()
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def _has_images(backend: ImagePool) -> bool:
    return bool(backend.volume_ids() or backend.snapshot_ids())


def open_pool_dir(
    pool_dir: str, *, reserved_bytes: int = 0, require_mountpoint: bool = False
) -> OpenedPool:
    ident = identity.open_identity(pool_dir, require_mountpoint=require_mountpoint)
    if os.statvfs(pool_dir).f_flag & os.ST_RDONLY:
        raise FailedPrecondition(
            f"pool {os.path.realpath(pool_dir)} is on a read-only filesystem; remount it "
            "read-write (the driver writes images and metadata there; nothing was changed)"
        )
    lock_fd = identity.hold(pool_dir)
    try:
        path = os.path.join(os.path.realpath(pool_dir), identity.META_DB)
        missing = not os.path.exists(path) or os.path.getsize(path) == 0
        if not missing:
            verify(path, ident.uuid)  # a damaged or foreign store: refused before anything moves
        backend = ImagePool(pool_dir, reserved_bytes=reserved_bytes, pool_uuid=ident.uuid)
        rebuilt = None
        if missing and _has_images(backend):
            log.warning(
                "pool %s has images but no metadata store: rebuilding %s from the images' own "
                "records (staging and publication records are found again in the mount table)",
                backend.root,
                path,
            )
            rebuilt = rebuild_store(backend, ident.uuid)
            for line in rebuilt.lines():
                log.warning("rebuild: %s", line)
        store = Store(path, before_write=backend.keep_metadata_room, pool_uuid=ident.uuid)
    except BaseException:
        os.close(lock_fd)
        raise
    return OpenedPool(ident, backend, store, lock_fd, rebuilt)


def rebuild_pool_dir(pool_dir: str) -> RebuildReport:
    """`stowagectl pool rebuild`: the pool must have its identity and no driver running on it."""
    root = os.path.realpath(pool_dir)
    record = identity.read_identity(root)
    if record is None:
        record = _identity_from_records(root)
    lock_fd = identity.hold(root)
    try:
        backend = ImagePool(root, pool_uuid=record.uuid)
        return rebuild_store(backend, record.uuid)
    finally:
        os.close(lock_fd)


def _identity_from_records(root: str) -> PoolRecord:
    """pool.json is lost: the images' records name their pool; if they all agree, that is it."""
    probe = ImagePool(root, inspect_only=True)
    uuids: set[str] = set()
    for object_id in probe.volume_ids() | probe.snapshot_ids():
        try:
            rec = probe.read_record(object_id)
        except RecordError:
            continue
        if rec is not None and rec.pool_uuid:
            uuids.add(rec.pool_uuid)
    if len(uuids) != 1:
        found = ", ".join(sorted(uuids)) or "none"
        raise FailedPrecondition(
            f"{root} has no pool.json and its images do not name one pool (found: {found}); "
            "not a Stowage pool, or made before pools had an identity (start the driver once "
            "with its meta.db in place to adopt it)"
        )
    (pool_uuid,) = uuids
    log.warning("pool.json of %s was missing; wrote it again for pool %s", root, pool_uuid)
    return identity.restore_identity(root, pool_uuid)


def store_state(pool_dir: str, pool_uuid: str) -> str:
    """ "ok", "missing" or the reason the store is refused (for `stowagectl check`)."""
    path = os.path.join(pool_dir, identity.META_DB)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return "missing"
    try:
        verify(path, pool_uuid)
    except StowageError as exc:
        return str(exc)
    return "ok"
