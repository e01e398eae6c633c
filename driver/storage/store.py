"""The pool's metadata store: SQLite in WAL mode with synchronous=FULL, plus an operation journal.

Rows are written after the files they describe are complete, and deleted before the files are
unlinked, so a crash leaves at worst an orphan file (reconciled to trash), never a row that
points at nothing.

Writes use group commit: concurrent writers share one open transaction, each in its own
savepoint, and one COMMIT (one WAL fsync) makes all of them durable before any of them returns.
Reads go through other connections, which in WAL mode see only committed transactions.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from driver import ids
from driver.errors import ResourceExhausted, Unavailable
from driver.model import (
    AccessMode,
    AccessType,
    BackupPhase,
    BackupState,
    ContentSource,
    FsType,
    GroupSnapshot,
    PendingRestore,
    Publication,
    Snapshot,
    Staging,
    Volume,
)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    access_type TEXT NOT NULL, fs_type TEXT NOT NULL, formatted INTEGER NOT NULL,
    source_kind TEXT, source_id TEXT, parameters TEXT NOT NULL, created_at REAL NOT NULL,
    sector_size INTEGER NOT NULL, mutable_parameters TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, source_volume_id TEXT NOT NULL,
    size INTEGER NOT NULL, fs_type TEXT NOT NULL, access_type TEXT NOT NULL,
    formatted INTEGER NOT NULL, created_at REAL NOT NULL, sector_size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stagings (
    volume_id TEXT PRIMARY KEY, path TEXT NOT NULL, device TEXT NOT NULL,
    access_type TEXT NOT NULL, fs_type TEXT NOT NULL, readonly INTEGER NOT NULL,
    mount_flags TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS publications (
    target TEXT PRIMARY KEY, volume_id TEXT NOT NULL, readonly INTEGER NOT NULL,
    access_mode INTEGER NOT NULL, pod_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS publications_volume ON publications (volume_id);
CREATE TABLE IF NOT EXISTS backups (
    snapshot_id TEXT PRIMARY KEY, target TEXT NOT NULL, phase TEXT NOT NULL,
    done_bytes INTEGER NOT NULL, total_bytes INTEGER NOT NULL, error_code TEXT NOT NULL,
    error TEXT NOT NULL, updated_at REAL NOT NULL, keep_local INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS restores (
    name TEXT PRIMARY KEY, volume_id TEXT NOT NULL UNIQUE, snapshot_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    snapshot_id TEXT PRIMARY KEY, group_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS group_members_group ON group_members (group_id);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, key TEXT NOT NULL,
    payload TEXT NOT NULL, started_at REAL NOT NULL
);
-- Written by versions with ControllerPublish (before the attach-free Controller); unused since.
DROP TABLE IF EXISTS attachments;
"""
# Columns added after the first release: (table, column, definition). A store made before them
# gets them at open (ALTER TABLE ... ADD COLUMN); a read-only open reads their defaults.
_ADDED_COLUMNS = (
    ("volumes", "mutable_parameters", "TEXT NOT NULL DEFAULT '{}'"),
    ("publications", "pod_uid", "TEXT NOT NULL DEFAULT ''"),
)


def _column(row: sqlite3.Row, name: str, default: str) -> str:
    """An added column's value; its default in a store opened read-only before it was added."""
    try:
        return str(row[name])
    except IndexError:
        return default


def _publication(r: sqlite3.Row) -> Publication:
    return Publication(
        r["volume_id"],
        r["target"],
        bool(r["readonly"]),
        AccessMode(r["access_mode"]),
        _column(r, "pod_uid", ""),
    )


def _volume(row: sqlite3.Row) -> Volume:
    source = ContentSource(row["source_kind"], row["source_id"]) if row["source_kind"] else None
    return Volume(
        id=row["id"],
        name=row["name"],
        size=row["size"],
        access_type=AccessType(row["access_type"]),
        fs_type=FsType.stored(row["fs_type"]),
        formatted=bool(row["formatted"]),
        source=source,
        parameters=json.loads(row["parameters"]),
        created_at=row["created_at"],
        sector_size=row["sector_size"],
        mutable_parameters=json.loads(_column(row, "mutable_parameters", "{}")),
    )


def _snapshot(row: sqlite3.Row) -> Snapshot:
    return Snapshot(
        id=row["id"],
        name=row["name"],
        source_volume_id=row["source_volume_id"],
        size=row["size"],
        fs_type=FsType.stored(row["fs_type"]),
        access_type=AccessType(row["access_type"]),
        formatted=bool(row["formatted"]),
        created_at=row["created_at"],
        sector_size=row["sector_size"],
        ready=not ids.is_backup_snapshot_id(row["id"]) or row["phase"] == BackupPhase.DONE,
        group_id=row["group_id"] or "",
    )


def _staging(r: sqlite3.Row) -> Staging:
    return Staging(
        r["volume_id"],
        r["path"],
        r["device"],
        AccessType(r["access_type"]),
        FsType.stored(r["fs_type"]),
        bool(r["readonly"]),
        tuple(json.loads(r["mount_flags"])),
    )


# Snapshots with the phase of their upload (NULL for local snapshots) and their group (NULL for
# a single snapshot).
_SNAPSHOTS = (
    "SELECT s.*, b.phase AS phase, m.group_id AS group_id FROM snapshots s"
    " LEFT JOIN backups b ON b.snapshot_id = s.id"
    " LEFT JOIN group_members m ON m.snapshot_id = s.id"
)


def _backup(row: sqlite3.Row) -> BackupState:
    return BackupState(
        snapshot_id=row["snapshot_id"],
        target=row["target"],
        phase=BackupPhase(row["phase"]),
        done_bytes=row["done_bytes"],
        total_bytes=row["total_bytes"],
        error_code=row["error_code"],
        error=row["error"],
        updated_at=row["updated_at"],
        keep_local=bool(row["keep_local"]),
    )


class _Batch:
    """The writers of one shared transaction; `done` is set once its COMMIT finished or failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: sqlite3.Error | None = None


_INSERT_VOLUME = "INSERT INTO volumes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
_INSERT_SNAPSHOT = "INSERT INTO snapshots VALUES (?,?,?,?,?,?,?,?,?)"


def _fs_text(fs_type: FsType | None) -> str:
    """How rows store a filesystem type: its name, "" for block (as every version wrote)."""
    return str(fs_type or "")


def _volume_row(v: Volume) -> tuple[object, ...]:
    """A volume as its `volumes` row (CreateVolume and the rebuild insert the same shape)."""
    return (
        v.id,
        v.name,
        v.size,
        v.access_type.value,
        _fs_text(v.fs_type),
        int(v.formatted),
        v.source.kind if v.source else None,
        v.source.id if v.source else None,
        json.dumps(v.parameters, sort_keys=True),
        v.created_at,
        v.sector_size,
        json.dumps(v.mutable_parameters, sort_keys=True),
    )


def _snapshot_row(s: Snapshot) -> tuple[object, ...]:
    return (
        s.id,
        s.name,
        s.source_volume_id,
        s.size,
        _fs_text(s.fs_type),
        s.access_type.value,
        int(s.formatted),
        s.created_at,
        s.sector_size,
    )


def _journal_insert(db: sqlite3.Connection, op: str, key: str, payload: dict[str, Any]) -> int:
    cur = db.execute(
        "INSERT INTO journal (op, key, payload, started_at) VALUES (?,?,?,?)",
        (op, key, json.dumps(payload, sort_keys=True), time.time()),
    )
    return int(cur.lastrowid or 0)


class StoreDamaged(Unavailable):
    """meta.db fails SQLite's integrity check, is not a database, or belongs to another pool.
    The driver refuses to serve from it and changes nothing; `stowagectl pool rebuild` makes a
    new one from the images' own records and moves this one aside."""


def _owner_only(path: str) -> None:
    """meta.db and its -wal/-shm are 0600 (SQLite gives -wal/-shm the main file's mode)."""
    for suffix in ("", "-wal", "-shm"):
        with suppress(OSError):
            if os.stat(path + suffix).st_mode & 0o077:
                os.chmod(path + suffix, 0o600)


def verify(path: str, pool_uuid: str = "") -> None:
    """Raise StoreDamaged unless `path` is a sound Stowage store (of pool `pool_uuid`, when
    given and recorded). Read-only: the file is opened with mode=ro and nothing is written."""
    what = f"metadata store {path}"
    advice = (
        "; the driver will not serve from it. Stop the driver and run "
        f"`stowagectl pool rebuild --pool-dir {os.path.dirname(path)}` (see docs/operations.md)"
    )
    # Without a -wal file (a clean shutdown) the store is opened immutable, which creates no
    # -wal/-shm beside it; with one, read-only, so that its committed frames are checked too.
    flag = "mode=ro" if os.path.exists(path + "-wal") else "immutable=1"
    try:
        db = sqlite3.connect(f"file:{path}?{flag}", uri=True)
    except sqlite3.Error as exc:
        raise StoreDamaged(f"{what} cannot be opened: {exc}{advice}") from exc
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in rows] != [("ok",)]:
            found = "; ".join(str(r[0]) for r in rows[:3])
            raise StoreDamaged(f"{what} fails SQLite's integrity check ({found}){advice}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        raise StoreDamaged(f"{what} is damaged or not a Stowage store: {exc}{advice}") from exc
    finally:
        db.close()
    if "schema" not in meta:
        raise StoreDamaged(f"{what} is not a Stowage store (no schema version){advice}")
    recorded = meta.get("pool_uuid", "")
    if pool_uuid and recorded and recorded != pool_uuid:
        raise StoreDamaged(
            f"{what} belongs to pool {recorded}, not to this pool {pool_uuid} (copied from "
            f"another node?){advice}"
        )


class Store:
    """Thread-safe. Writes go through one connection and are group-committed (see `_tx`):
    every write method returns only once its rows are durable. Reads use a small pool of other
    connections, which in WAL mode see only committed transactions."""

    def __init__(
        self,
        path: str,
        *,
        readonly: bool = False,
        before_write: Callable[[], None] | None = None,
        pool_uuid: str = "",
    ) -> None:
        """`readonly` opens an existing store for inspection (stowagectl check) and never
        creates or migrates anything. `before_write` runs before every write (the pool uses it
        to release its metadata reserve when the disk is full)."""
        self.path = path
        self._readonly = readonly
        self._before_write = before_write
        self._lock = threading.Lock()  # the write connection and `_batch`
        self._batch: _Batch | None = None  # writers of the open transaction; None: none open
        self._arrivals = 0  # writers waiting for `_lock`
        self._arrivals_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []  # idle read connections
        self._readers_lock = threading.Lock()
        self._closed = False
        if readonly:
            if not os.path.isfile(path):
                raise Unavailable(f"metadata store {path} does not exist")
            self._db = self._connect_reader()  # writes fail on it; reads use the pool
            return
        # An existing store is checked before anything writes to it (a damaged one is left
        # exactly as found); a new one is made owner-only before SQLite opens it.
        try:
            if os.path.getsize(path) > 0:
                verify(path, pool_uuid)
        except FileNotFoundError:
            try:
                with suppress(FileExistsError):
                    os.close(
                        os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                    )
            except OSError as exc:
                raise Unavailable(f"metadata store {path} is unusable: {exc}") from exc
        except OSError as exc:
            raise Unavailable(f"metadata store {path} is unusable: {exc}") from exc
        _owner_only(path)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            for table, column, definition in _ADDED_COLUMNS:
                have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            if pool_uuid:  # a store made before pools had an identity takes this one
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('pool_uuid', ?)",
                    (pool_uuid,),
                )
            _owner_only(path)
        except sqlite3.Error as exc:
            raise Unavailable(f"metadata store {path} is unusable: {exc}") from exc

    def _connect_reader(self) -> sqlite3.Connection:
        try:
            if self._readonly:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            raise Unavailable(f"metadata store {self.path} is unusable: {exc}") from exc
        return db

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            self._db.close()
            for db in self._readers:
                db.close()
            self._readers.clear()

    def _error(self, exc: sqlite3.Error) -> Unavailable | ResourceExhausted:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return ResourceExhausted(
                f"metadata store {self.path} has no room left on the pool: {exc}"
            )
        return Unavailable(f"metadata store {self.path} failed: {exc}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One caller's writes, durable when the block exits (group commit).

        The caller's statements run in a savepoint inside the transaction its concurrent
        writers share, so a failing caller rolls back only its own. The last writer in (nobody
        else waiting for the lock) commits the transaction for all of them, while the others
        wait for that COMMIT and get its outcome: one fsync for the whole batch.
        """
        with self._arrivals_lock:
            self._arrivals += 1
        with self._lock:
            with self._arrivals_lock:
                self._arrivals -= 1
            try:
                if self._before_write is not None:
                    self._before_write()
                try:
                    if self._batch is None:
                        self._db.execute("BEGIN IMMEDIATE")
                        self._batch = _Batch()
                    batch = self._batch
                    self._db.execute("SAVEPOINT caller")
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
                try:
                    yield self._db
                    self._db.execute("RELEASE caller")
                except BaseException as exc:
                    self._undo_savepoint(exc)
                    if isinstance(exc, sqlite3.Error):
                        raise self._error(exc) from exc
                    raise
            finally:
                with self._arrivals_lock:
                    last = self._arrivals == 0
                if last and self._batch is not None:
                    self._commit()
        batch.done.wait()
        if batch.error is not None:
            raise self._error(batch.error) from batch.error

    def _undo_savepoint(self, exc: BaseException) -> None:
        """Roll back a failed caller's savepoint. If SQLite already rolled back the whole
        transaction (it may on SQLITE_FULL or an I/O error), nobody's rows in it survive: the
        batch fails with that error."""
        if self._batch is None:
            return
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO caller")
                self._db.execute("RELEASE caller")
                return
        except sqlite3.Error as rollback_failed:
            exc = rollback_failed
        self._finish(exc if isinstance(exc, sqlite3.Error) else sqlite3.OperationalError(exc))

    def _commit(self) -> None:
        """COMMIT the open transaction for every writer in it (the caller holds `_lock`)."""
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._finish(exc)
        else:
            self._finish(None)

    def _finish(self, error: sqlite3.Error | None) -> None:
        """End the open batch with `error` (None: committed) and release its writers."""
        assert self._batch is not None
        if error is not None and self._db.in_transaction:
            with suppress(sqlite3.Error):  # if it fails, the next BEGIN reports it
                self._db.execute("ROLLBACK")
        self._batch.error = error
        self._batch.done.set()
        self._batch = None

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """An idle read connection (a new one when none is), back in the pool after the block;
        closed instead when the store was closed meanwhile."""
        with self._readers_lock:
            if self._closed:
                raise Unavailable(f"metadata store {self.path} is closed")
            db = self._readers.pop() if self._readers else None
        if db is None:
            db = self._connect_reader()
        try:
            yield db
        finally:
            with self._readers_lock:
                if self._closed:
                    db.close()
                else:
                    self._readers.append(db)

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._reader() as db:
            try:
                return list(db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise Unavailable(f"metadata store {self.path} failed: {exc}") from exc

    def healthy(self) -> bool:
        try:
            self._all("SELECT value FROM meta WHERE key = 'schema'")
        except Unavailable:
            return False
        return True

    # --- volumes ------------------------------------------------------------------------------
    def add_volume(self, v: Volume, finishes_restore: bool = False) -> None:
        """Record a volume; `finishes_restore` drops its pending restore in the same
        transaction."""
        with self._tx() as db:
            if finishes_restore:
                db.execute("DELETE FROM restores WHERE name = ?", (v.name,))
            db.execute(_INSERT_VOLUME, _volume_row(v))

    def get_volume(self, volume_id: str) -> Volume | None:
        rows = self._all("SELECT * FROM volumes WHERE id = ?", (volume_id,))
        return _volume(rows[0]) if rows else None

    def volume_by_name(self, name: str) -> Volume | None:
        rows = self._all("SELECT * FROM volumes WHERE name = ?", (name,))
        return _volume(rows[0]) if rows else None

    def list_volumes(self, after: str = "", limit: int = 0) -> list[Volume]:
        sql, args = "SELECT * FROM volumes WHERE id > ? ORDER BY id", [after]
        if limit:
            sql += " LIMIT ?"
            args.append(str(limit))
        return [_volume(r) for r in self._all(sql, tuple(args))]

    def set_volume_size(self, volume_id: str, size: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE volumes SET size = ? WHERE id = ?", (size, volume_id))

    def set_formatted(self, volume_id: str, fs_type: FsType) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE volumes SET formatted = 1, fs_type = ? WHERE id = ?",
                (_fs_text(fs_type), volume_id),
            )

    def set_mutable_parameters(self, volume_id: str, mutable: dict[str, str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE volumes SET mutable_parameters = ? WHERE id = ?",
                (json.dumps(mutable, sort_keys=True), volume_id),
            )

    def remove_volume(self, volume_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    # --- snapshots ----------------------------------------------------------------------------
    def add_snapshot(self, s: Snapshot, backup_target: str = "", keep_local: bool = True) -> None:
        """Record a snapshot; with `backup_target`, its upload state (pending) in the same
        transaction."""
        with self._tx() as db:
            if backup_target:
                db.execute(
                    "INSERT INTO backups VALUES (?,?,?,0,?,'','',?,?)",
                    (s.id, backup_target, BackupPhase.PENDING.value, s.size, time.time(),
                     int(keep_local)),
                )
            db.execute(_INSERT_SNAPSHOT, _snapshot_row(s))

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        rows = self._all(_SNAPSHOTS + " WHERE s.id = ?", (snapshot_id,))
        return _snapshot(rows[0]) if rows else None

    def snapshot_by_name(self, name: str) -> Snapshot | None:
        rows = self._all(_SNAPSHOTS + " WHERE s.name = ?", (name,))
        return _snapshot(rows[0]) if rows else None

    def list_snapshots(
        self, after: str = "", limit: int = 0, source_volume_id: str = ""
    ) -> list[Snapshot]:
        sql, args = _SNAPSHOTS + " WHERE s.id > ?", [after]
        if source_volume_id:
            sql += " AND s.source_volume_id = ?"
            args.append(source_volume_id)
        sql += " ORDER BY s.id"
        if limit:
            sql += " LIMIT ?"
            args.append(str(limit))
        return [_snapshot(r) for r in self._all(sql, tuple(args))]

    def remove_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
            db.execute("DELETE FROM backups WHERE snapshot_id = ?", (snapshot_id,))
            db.execute("DELETE FROM group_members WHERE snapshot_id = ?", (snapshot_id,))

    # --- group snapshots ----------------------------------------------------------------------
    def add_group(self, g: GroupSnapshot, journal_seq: int) -> None:
        """Record a group snapshot and every member snapshot, and close the journal entry that
        made their images, in one transaction: the whole group is recorded or none of it."""
        with self._tx() as db:
            db.executemany(_INSERT_SNAPSHOT, [_snapshot_row(s) for s in g.snapshots])
            db.execute("INSERT INTO groups VALUES (?,?,?)", (g.id, g.name, g.created_at))
            db.executemany(
                "INSERT INTO group_members VALUES (?,?)", [(s.id, g.id) for s in g.snapshots]
            )
            db.execute("DELETE FROM journal WHERE seq = ?", (journal_seq,))

    def remove_group(self, g: GroupSnapshot, op: str, payload: dict[str, Any]) -> int:
        """Remove a group snapshot and its members' rows and open a journal entry (`op`,
        `payload`: the images still to unlink) in one transaction; returns the entry's seq."""
        with self._tx() as db:
            for s in g.snapshots:
                db.execute("DELETE FROM snapshots WHERE id = ?", (s.id,))
                db.execute("DELETE FROM group_members WHERE snapshot_id = ?", (s.id,))
            db.execute("DELETE FROM group_members WHERE group_id = ?", (g.id,))
            db.execute("DELETE FROM groups WHERE id = ?", (g.id,))
            return _journal_insert(db, op, g.id, payload)

    def _group(self, rows: list[sqlite3.Row]) -> GroupSnapshot | None:
        if not rows:
            return None
        gid = rows[0]["id"]
        members = self._all(_SNAPSHOTS + " WHERE m.group_id = ? ORDER BY s.id", (gid,))
        return GroupSnapshot(
            gid, rows[0]["name"], rows[0]["created_at"], tuple(_snapshot(r) for r in members)
        )

    def group(self, group_id: str) -> GroupSnapshot | None:
        return self._group(self._all("SELECT * FROM groups WHERE id = ?", (group_id,)))

    def group_by_name(self, name: str) -> GroupSnapshot | None:
        return self._group(self._all("SELECT * FROM groups WHERE name = ?", (name,)))

    # --- backups: upload state of backup snapshots, restores under way ----------------------
    def backup(self, snapshot_id: str) -> BackupState | None:
        rows = self._all("SELECT * FROM backups WHERE snapshot_id = ?", (snapshot_id,))
        return _backup(rows[0]) if rows else None

    def backups(self, *phases: BackupPhase) -> list[BackupState]:
        sql, args = "SELECT * FROM backups", [p.value for p in phases]
        if phases:
            sql += f" WHERE phase IN ({','.join('?' * len(phases))})"
        return [_backup(r) for r in self._all(sql + " ORDER BY updated_at", tuple(args))]

    def set_backup(
        self,
        snapshot_id: str,
        phase: BackupPhase,
        *,
        done_bytes: int | None = None,
        total_bytes: int | None = None,
        error_code: str = "",
        error: str = "",
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE backups SET phase = ?, done_bytes = COALESCE(?, done_bytes),"
                " total_bytes = COALESCE(?, total_bytes), error_code = ?, error = ?,"
                " updated_at = ? WHERE snapshot_id = ?",
                (phase.value, done_bytes, total_bytes, error_code, error, time.time(),
                 snapshot_id),
            )

    def ensure_backup(self, snapshot_id: str, target: str, size: int) -> None:
        """A backup row for a backup snapshot that has none (adopted from its image's record)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO backups VALUES (?,?,?,0,?,'','',?,1)",
                (snapshot_id, target, BackupPhase.PENDING.value, size, time.time()),
            )

    def backup_base(self, volume_id: str, target: str, exclude: str) -> Snapshot | None:
        """The newest snapshot of `volume_id` uploaded to `target`: the base of an incremental
        backup (its local copy is the reflink base, its manifest the chunk list)."""
        rows = self._all(
            _SNAPSHOTS + " WHERE s.source_volume_id = ? AND b.target = ? AND b.phase = ?"
            " AND s.id != ? ORDER BY s.created_at DESC LIMIT 1",
            (volume_id, target, BackupPhase.DONE.value, exclude),
        )
        return _snapshot(rows[0]) if rows else None

    def pending_restore(self, name: str) -> PendingRestore | None:
        rows = self._all("SELECT * FROM restores WHERE name = ?", (name,))
        if not rows:
            return None
        r = rows[0]
        return PendingRestore(r["name"], r["volume_id"], r["snapshot_id"], r["created_at"])

    def pending_restores(self) -> list[PendingRestore]:
        return [
            PendingRestore(r["name"], r["volume_id"], r["snapshot_id"], r["created_at"])
            for r in self._all("SELECT * FROM restores ORDER BY created_at")
        ]

    def add_pending_restore(self, r: PendingRestore) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO restores VALUES (?,?,?,?)",
                (r.name, r.volume_id, r.snapshot_id, r.created_at),
            )

    def remove_pending_restore(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM restores WHERE name = ?", (name,))

    def in_use(self, volume_id: str) -> bool:
        """True when the volume is staged or published on this node (one read): what a delete
        must find false."""
        rows = self._all(
            "SELECT 1 FROM stagings WHERE volume_id = ?1"
            " UNION ALL SELECT 1 FROM publications WHERE volume_id = ?1 LIMIT 1",
            (volume_id,),
        )
        return bool(rows)

    # --- node stagings and publications ---------------------------------------------------------
    def staging(self, volume_id: str) -> Staging | None:
        rows = self._all("SELECT * FROM stagings WHERE volume_id = ?", (volume_id,))
        return _staging(rows[0]) if rows else None

    def stagings(self) -> list[Staging]:
        return [_staging(r) for r in self._all("SELECT * FROM stagings ORDER BY volume_id")]

    def put_staging(self, s: Staging) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO stagings VALUES (?,?,?,?,?,?,?)",
                (
                    s.volume_id,
                    s.path,
                    s.device,
                    s.access_type.value,
                    _fs_text(s.fs_type),
                    int(s.readonly),
                    json.dumps(list(s.mount_flags)),
                ),
            )

    def remove_staging(self, volume_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM stagings WHERE volume_id = ?", (volume_id,))

    def publications(self, volume_id: str | None = None) -> list[Publication]:
        if volume_id is None:
            rows = self._all("SELECT * FROM publications ORDER BY target")
        else:
            rows = self._all(
                "SELECT * FROM publications WHERE volume_id = ? ORDER BY target", (volume_id,)
            )
        return [_publication(r) for r in rows]

    def publication(self, target: str) -> Publication | None:
        rows = self._all("SELECT * FROM publications WHERE target = ?", (target,))
        return _publication(rows[0]) if rows else None

    def put_publication(self, p: Publication) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO publications VALUES (?,?,?,?,?)",
                (p.target, p.volume_id, int(p.readonly), int(p.access_mode), p.pod_uid),
            )

    def remove_publication(self, target: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM publications WHERE target = ?", (target,))

    # --- journal ----------------------------------------------------------------------------------
    def journal_begin(self, op: str, key: str, payload: dict[str, Any]) -> int:
        with self._tx() as db:
            return _journal_insert(db, op, key, payload)

    def journal_end(self, seq: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM journal WHERE seq = ?", (seq,))

    def journal(self) -> list[tuple[int, str, str, dict[str, Any]]]:
        return [
            (r["seq"], r["op"], r["key"], json.loads(r["payload"]))
            for r in self._all("SELECT * FROM journal ORDER BY seq")
        ]

    def provisioned_bytes(self) -> int:
        """The sum of every volume's size: what the pool promised (thin: more than it holds)."""
        rows = self._all("SELECT COALESCE(SUM(size), 0) AS n FROM volumes")
        return int(rows[0]["n"])

    def counts(self) -> tuple[int, int]:
        rows = self._all(
            "SELECT (SELECT COUNT(*) FROM volumes) AS v, (SELECT COUNT(*) FROM snapshots) AS s"
        )
        return int(rows[0]["v"]), int(rows[0]["s"])

    # --- rebuild and backup -------------------------------------------------------------------
    def import_rows(
        self,
        volumes: list[Volume],
        snapshots: list[Snapshot],
        groups: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        """Insert many volume and snapshot rows in one transaction (the rebuild); `groups`
        (group ID -> name, creation time) and the snapshots' `group_id` give the groups."""
        with self._tx() as db:
            db.executemany(_INSERT_VOLUME, [_volume_row(v) for v in volumes])
            db.executemany(_INSERT_SNAPSHOT, [_snapshot_row(s) for s in snapshots])
            known = groups or {}
            db.executemany(
                "INSERT INTO groups VALUES (?,?,?)",
                [(gid, name, at) for gid, (name, at) in known.items()],
            )
            db.executemany(
                "INSERT INTO group_members VALUES (?,?)",
                [(s.id, s.group_id) for s in snapshots if s.group_id in known],
            )

    def backup_to(self, dest: str) -> None:
        """A consistent copy of the store at `dest` (SQLite online backup, 0600), written
        beside and renamed over the previous copy."""
        tmp = dest + ".tmp"
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        try:
            out = sqlite3.connect(tmp)
            try:
                with self._reader() as src:
                    src.backup(out)
                out.execute("PRAGMA journal_mode=DELETE")
            finally:
                out.close()
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, dest)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
