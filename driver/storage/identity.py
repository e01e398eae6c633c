"""Which directory is a pool: `<pool>/pool.json`, written once when the pool is made.

`open_identity` decides, before anything in the directory is touched:

- `pool.json` present and readable: this is the pool; its UUID is returned.
- the directory is empty (apart from `lost+found`, which mkfs.ext4 makes): a new pool is made
  there and `pool.json` written (fsynced, 0600) before anything else.
- no `pool.json` but a `meta.db`: a pool made before pools had an identity; it is adopted (a UUID
  is written once, logged).
- anything else: refused, touching nothing. A data disk that failed to mount leaves its mount
  point as a directory of the root filesystem, and an empty pool there would answer NOT_FOUND
  for every volume and fill `/`.

With `require_mountpoint` a directory that is not a mount point is refused first.

The pool is held with an exclusive `flock` on `pool.json` while a driver (or a rebuild) uses it,
so two processes never write one pool's metadata at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass

from driver.errors import FailedPrecondition, Unavailable
from driver.records import PoolRecord, RecordError

log = logging.getLogger(__name__)

IDENTITY = "pool.json"
META_DB = "meta.db"
_IGNORED = {"lost+found"}
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class Identity:
    record: PoolRecord
    how: str  # "existing" | "created" | "adopted"

    @property
    def uuid(self) -> str:
        return self.record.uuid


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_identity(root: str) -> PoolRecord | None:
    """The pool's record, None when the directory has none; FailedPrecondition when damaged."""
    try:
        with open(os.path.join(root, IDENTITY), "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unavailable(f"cannot read {os.path.join(root, IDENTITY)}: {exc.strerror}") from exc
    try:
        return PoolRecord.from_json(raw)
    except RecordError as exc:
        raise FailedPrecondition(
            f"{os.path.join(root, IDENTITY)} is damaged ({exc}); restore it from a backup or "
            "see docs/operations.md"
        ) from exc


def _write_identity(root: str, record: PoolRecord) -> None:
    path = os.path.join(root, IDENTITY)
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # ours, from a start-up that ended mid-write
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, record.to_json())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(root)


def open_identity(root: str, *, require_mountpoint: bool = False) -> Identity:
    """The pool at `root`: existing, newly made or adopted; refused with a one-line reason."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise Unavailable(f"pool directory {root} does not exist")
    if require_mountpoint and not os.path.ismount(root):
        raise FailedPrecondition(
            f"pool directory {root} is not a mount point and --pool-require-mountpoint is set: "
            "is the pool's disk mounted? (see docs/operations.md)"
        )
    record = read_identity(root)
    if record is not None:
        _tighten(root)
        return Identity(record, "existing")
    entries = sorted(set(os.listdir(root)) - _IGNORED - {IDENTITY + ".tmp"})
    if not entries:
        record = PoolRecord.new(time.time())
        _write_identity(root, record)
        os.chmod(root, DIR_MODE)
        log.info("made a new pool %s in %s", record.uuid, root)
        return Identity(record, "created")
    if META_DB in entries:
        # A pool made before identities, or one whose pool.json was lost: a store that already
        # names its pool keeps that UUID (its volumes carry it in their contexts).
        known = recorded_uuid(os.path.join(root, META_DB))
        record = PoolRecord(known, time.time()) if known else PoolRecord.new(time.time())
        _write_identity(root, record)
        _tighten(root)
        log.warning(
            "adopted pool %s: it had no pool.json (made before pools had an identity); "
            "its identity is now %s",
            root,
            record.uuid,
        )
        return Identity(record, "adopted")
    shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
    raise FailedPrecondition(
        f"{root} is not a Stowage pool (no pool.json) and is not empty ({shown}); refusing to "
        "make a pool there. Mount the pool's disk at it, or give --pool-dir an empty directory"
    )


def recorded_uuid(db_path: str) -> str:
    """The pool UUID a store recorded, "" when none or unreadable (never writes: immutable)."""
    try:
        db = sqlite3.connect(f"file:{db_path}?immutable=1", uri=True)
        try:
            rows = db.execute("SELECT value FROM meta WHERE key = 'pool_uuid'").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return ""
    if not rows:
        return ""
    try:
        return str(uuid.UUID(str(rows[0][0])))
    except ValueError:
        return ""


def restore_identity(root: str, pool_uuid: str) -> PoolRecord:
    """Write a lost pool.json again with the UUID the pool's images record."""
    record = PoolRecord(pool_uuid, time.time())
    _write_identity(os.path.realpath(root), record)
    return record


def _tighten(root: str) -> None:
    """Owner-only modes on the pool directory and the identity file (pools made before they
    were enforced kept whatever the umask gave)."""
    with contextlib.suppress(OSError):
        if os.stat(root).st_mode & 0o077:
            os.chmod(root, DIR_MODE)
        path = os.path.join(root, IDENTITY)
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, FILE_MODE)


def hold(root: str) -> int:
    """Take the pool for this process (exclusive flock on pool.json); the fd keeps it until
    closed or the process ends."""
    path = os.path.join(os.path.realpath(root), IDENTITY)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FailedPrecondition(
                f"pool {os.path.dirname(path)} is in use by another process (a running driver "
                "or a rebuild); stop it first"
            ) from exc
        raise
    return fd
