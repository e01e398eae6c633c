"""The backup engine: back an image up into a repository, restore, verify, list, delete, collect
garbage. A library with a small typed API; the CSI core calls it (docs/backup-format.md).

Data path: the image is planned block by block (a hole, unchanged since the base, or to read);
a thread pool runs read -> zero check -> keyed BLAKE3 -> zstd -> AES-GCM -> upload per run of
blocks to read (at most one aligned region of the chunk size: one chunk, split at all-zero
blocks); those steps run in native code that releases the GIL, so two cores stay busy. At most
`2 * workers` runs are in flight, which bounds memory. Blocks that need no read never enter the
pool. Whether a chunk is already stored comes from one listing of `chunks/` when that takes
fewer requests than a HEAD per chunk to read. A restore fetches each chunk once and writes every
slice of it the manifest places; its checkpoints (fsync, then the state file) run on their own
thread while downloads go on. Figures: docs/performance.md, "Backups".
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from driver import errors, faults
from driver.backup import extents
from driver.backup.format import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    ChunkRef,
    Manifest,
    check_snapshot_id,
    chunk_id,
    chunk_key_name,
    holds,
    manifest_from_json,
    manifest_key_name,
    merge_runs,
    open_chunk,
    open_document,
    open_manifest,
    seal_chunk,
    seal_document,
    seal_manifest,
)
from driver.backup.keys import RepositoryKey
from driver.backup.s3 import Credentials, Store, Target

log = logging.getLogger(__name__)

CONFIG_KEY = "config"
CANDIDATES_KEY = "gc/candidates"
SWEEPING_PREFIX = "gc/sweeping/"
MARKERS_PREFIX = "inflight/"
#: A backup that reads at least LIST_MIN runs of blocks (each at most one chunk) lists chunks/
#: instead of a HEAD per chunk, as long as the target holds at most LIST_PER_HEAD times as many
#: chunks as it reads.
LIST_MIN = 1000
LIST_PER_HEAD = 10
#: Server timestamps have one-second resolution: anything this close to the candidate list's
#: time counts as older than it.
CLOCK_MARGIN = 2.0

T = TypeVar("T")


@dataclass(frozen=True)
class SnapshotRecord:
    """What the caller knows about the snapshot being backed up."""

    snapshot_id: str
    source_volume_id: str
    name: str = ""
    filesystem: str = ""
    sector_size: int = 512
    created: str | None = None  # RFC 3339; now when None


@dataclass(frozen=True)
class Progress:
    phase: str  # "backup", "restore", "verify"
    done_bytes: int
    total_bytes: int
    transferred_bytes: int


ProgressFn = Callable[[Progress], None]


@dataclass
class BackupResult:
    manifest: Manifest
    mode: str  # "full", "extents" (incremental from extent maps), "read-and-hash"
    read_bytes: int = 0
    uploaded_bytes: int = 0
    uploaded_chunks: int = 0  # chunk objects written
    reused_chunks: int = 0  # blocks taken from the base or already stored
    hole_chunks: int = 0  # blocks left holes
    already_done: bool = False


@dataclass
class VerifyReport:
    snapshot_id: str
    chunks: int = 0
    verified: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # chunk ID -> reason

    @property
    def ok(self) -> bool:
        return not self.damaged


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    modified: float


@dataclass
class GcReport:
    swept: bool = False
    postponed: str | None = None
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    candidates: int = 0
    candidate_bytes: int = 0
    referenced_chunks: int = 0


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local_error(exc: OSError, what: str) -> errors.StowageError:
    """A local I/O error as a domain error: a full disk is ResourceExhausted."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.ResourceExhausted(f"{what}: {exc.strerror}")
    if exc.errno == errno.ENOENT:
        return errors.NotFound(f"{what}: {exc.strerror}: {exc.filename}")
    return errors.Internal(f"{what}: {exc.strerror}")


def _overlaps(ranges: list[extents.Range], starts: list[int], lo: int, hi: int) -> bool:
    i = bisect.bisect_right(starts, lo) - 1
    if i >= 0 and ranges[i].end > lo:
        return True
    return i + 1 < len(ranges) and ranges[i + 1].offset < hi


class _Marker:
    """This writer's in-flight marker: written before any chunk is uploaded, refreshed while the
    backup runs, removed when the manifest is written. Claims name GC candidates it relies on."""

    def __init__(self, repo: Repository, snapshot_id: str) -> None:
        self.repo = repo
        self.key = MARKERS_PREFIX + uuid.uuid4().hex
        self.snapshot_id = snapshot_id
        self.started: float | None = None
        self._started_mono = time.monotonic()
        self.claims: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_ok = time.monotonic()

    def _body(self) -> bytes:
        return json.dumps(
            {"snapshot_id": self.snapshot_id, "started": self.started,
             "claims": sorted(self.claims)}
        ).encode()

    def write(self) -> None:
        with self._lock:
            t = time.monotonic()
            self.repo.store.put(self.key, self._body())
            self.last_ok = t

    def start(self) -> float:
        self.write()
        info = self.repo.store.head(self.key)
        if info is None:
            raise errors.Unavailable("the backup target lost an object just written (marker)")
        self.started = info.modified
        self._started_mono = time.monotonic()
        self.write()
        self._thread = threading.Thread(target=self._refresh, name="backup-marker", daemon=True)
        self._thread.start()
        return info.modified

    def _refresh(self) -> None:
        while not self._stop.wait(self.repo.refresh_interval):
            try:
                self.write()
            except errors.StowageError as exc:
                log.warning("cannot refresh backup in-flight marker: %s", exc)

    def server_now(self) -> float:
        """The object store's clock, estimated from this marker's first write."""
        return (self.started or 0.0) + time.monotonic() - self._started_mono

    def claim(self, cid: str) -> None:
        with self._lock:
            self.claims.add(cid)
        self.write()

    def check_fresh(self) -> None:
        if time.monotonic() - self.last_ok > self.repo.stale_after - self.repo.refresh_interval:
            raise errors.Unavailable(
                "the backup's in-flight marker could not be refreshed in time; garbage collection "
                "may no longer protect its chunks: retry the backup"
            )

    def stop(self, remove: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if remove:
            try:
                self.repo.store.delete(self.key)
            except errors.StowageError as exc:
                log.warning("cannot remove backup in-flight marker %s: %s", self.key, exc)


class Repository:
    """One backup target's repository under one key."""

    def __init__(
        self,
        store: Store,
        key: RepositoryKey,
        cluster_id: str = "",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int = 4,
        stale_after: float = 600.0,
        refresh_interval: float | None = None,
        block_size: int | None = None,
    ) -> None:
        block_size = block_size or min(chunk_size, DEFAULT_BLOCK_SIZE)
        if block_size < 4096 or block_size % 4096:
            raise errors.InvalidArgument("block size must be a multiple of 4 KiB")
        if chunk_size < block_size or chunk_size % block_size or chunk_size > 64 << 20:
            raise errors.InvalidArgument(
                "chunk size must be a multiple of the block size up to 64 MiB"
            )
        if workers < 1:
            raise errors.InvalidArgument("workers must be at least 1")
        self.store = store
        self.key = key
        self.cluster_id = cluster_id
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.workers = workers
        self.stale_after = stale_after
        self.refresh_interval = refresh_interval or stale_after / 4
        self._zero = bytes(block_size)
        #: A restore records its durable chunks at least this often (seconds).
        self.checkpoint_interval = 2.0
        self._config_checked = False

    @classmethod
    def open(
        cls,
        target: Target,
        key: RepositoryKey,
        cluster_id: str,
        *,
        workers: int = 4,
        rate_limit: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        credentials: Credentials | None = None,
    ) -> Repository:
        """The repository of a configured target: credentials from the environment unless given,
        `workers` parallel transfers, an optional `rate_limit` in bytes/s shared by them."""
        store = Store(
            target,
            credentials or Credentials.from_env(),
            max_connections=workers + 4,
            rate_limit=rate_limit,
        )
        return cls(store, key, cluster_id=cluster_id, chunk_size=chunk_size, workers=workers)

    # ---- repository config -----------------------------------------------------------------

    def _check_config(self, create: bool) -> None:
        if self._config_checked:
            return
        try:
            blob = self.store.get(CONFIG_KEY)
        except errors.NotFound:
            if not create:
                self.store.check()
                self._config_checked = True
                return
            doc = {"format": "stowage-backup-repository", "version": 1, "key_id": self.key.key_id}
            self.store.put(CONFIG_KEY, seal_document(self.key, CONFIG_KEY, doc))
            log.info("initialised backup repository on target %s (key ID %s)",
                     self.store.target.name, self.key.key_id)
        else:
            try:
                open_document(self.key, CONFIG_KEY, blob)
            except errors.FailedPrecondition as exc:
                raise errors.FailedPrecondition(
                    f"target {self.store.target.name}: the repository belongs to another backup "
                    f"key ({exc})"
                ) from None
        self._config_checked = True

    # ---- helpers ---------------------------------------------------------------------------

    def _pipeline(
        self,
        items: Iterable[T],
        fn: Callable[[T], Any],
        on_done: Callable[[T, Any], None],
        shortcut: Callable[[T], Any] | None = None,
    ) -> None:
        """fn(item) on the pool with at most 2 * workers in flight; on_done in the caller's
        thread, in submission order. The first error cancels what has not started and raises.
        `shortcut(item)`, when given, runs in the caller's thread first: a result other than
        None is the item's result without a trip through the pool (holes, unchanged chunks)."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="backup") as pool:
            window: collections.deque[tuple[T, Future[Any]]] = collections.deque()
            try:
                for item in items:
                    quick = shortcut(item) if shortcut is not None else None
                    if quick is not None:
                        fut: Future[Any] = Future()
                        fut.set_result(quick)
                    else:
                        fut = pool.submit(fn, item)
                    window.append((item, fut))
                    if len(window) >= 2 * self.workers:
                        it, fut = window.popleft()
                        on_done(it, fut.result())
                while window:
                    it, fut = window.popleft()
                    on_done(it, fut.result())
            except BaseException:
                for _, fut in window:
                    fut.cancel()
                raise

    def _load_candidates(self) -> tuple[set[str], float | None]:
        """The candidate list and its server time (from the same GET: consistent)."""
        try:
            blob, modified = self.store.get_with_time(CANDIDATES_KEY)
        except errors.NotFound:
            return set(), None
        try:
            doc = json.loads(blob)
            return set(doc["chunks"]), modified
        except (ValueError, KeyError, TypeError):
            raise errors.DataLoss("the garbage collector's candidate list is malformed") from None

    def _sweeping(self, now: float) -> bool:
        """True while a fresh sweep (GC pass 2) runs; stale sweep markers are ignored."""
        return any(
            now - o.modified <= self.stale_after for o in self.store.list(SWEEPING_PREFIX)
        )

    def _wait_no_sweep(self, now: float) -> None:
        """Wait while a fresh sweep runs (at most `stale_after`)."""
        deadline = time.monotonic() + self.stale_after
        while True:
            if not self._sweeping(now):
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)
            now += 0.5

    def _present_chunks(self, limit: int) -> set[str] | None:
        """The IDs of the chunks the target holds, or None when there are more than `limit`.
        Safe to rely on for the whole backup: the garbage collector deletes only candidates
        (which the caller loaded before) and never sweeps while this backup's marker is fresh
        and older than the candidate list."""
        out: set[str] = set()
        for o in self.store.list("chunks/"):
            out.add(o.key.rsplit("/", 1)[-1])
            if len(out) > limit:
                return None
        return out

    def _manifest(self, snapshot_id: str) -> Manifest:
        try:
            blob = self.store.get(manifest_key_name(snapshot_id))
        except errors.NotFound:
            raise errors.NotFound(
                f"backup {snapshot_id} does not exist on target {self.store.target.name}"
            ) from None
        return open_manifest(self.key, snapshot_id, blob)

    # ---- backup ----------------------------------------------------------------------------

    def backup(
        self,
        image_path: str,
        record: SnapshotRecord,
        base: tuple[str, Manifest] | None = None,
        progress: ProgressFn | None = None,
    ) -> BackupResult:
        """Back `image_path` up as `record.snapshot_id`. With `base` = (path of the local copy of
        an earlier backed-up snapshot, its manifest), only ranges the extent maps name as changed
        are read; where extents cannot be compared every chunk is read and hashed and only chunks
        the base does not hold are uploaded. Idempotent: a re-run after any failure uploads only
        what is missing; the manifest is written last."""
        sid = check_snapshot_id(record.snapshot_id)
        self._check_config(create=True)
        existing = self.store.head(manifest_key_name(sid))
        if existing is not None:
            m = self._manifest(sid)
            return BackupResult(m, "full", already_done=True)
        try:
            fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise errors.NotFound(f"cannot open image {image_path}: {exc.strerror}") from exc
        marker = _Marker(self, sid)
        ok = False
        try:
            started = marker.start()
            self._wait_no_sweep(started)
            candidates, _ = self._load_candidates()
            try:
                result = self._backup(fd, image_path, record, base, progress, marker, candidates)
            except OSError as exc:
                raise _local_error(exc, f"reading {image_path}") from exc
            marker.check_fresh()
            try:  # what a reader would refuse is never stored
                manifest_from_json(result.manifest.to_json(), sid)
            except errors.DataLoss as exc:
                raise errors.Internal(f"refusing to store an invalid manifest: {exc}") from None
            self.store.put(manifest_key_name(sid), seal_manifest(self.key, result.manifest))
            ok = True
            return result
        finally:
            os.close(fd)
            marker.stop(remove=True)
            if not ok:
                log.info("backup %s did not complete; a retry uploads only what is missing", sid)

    def _plan_base(
        self, image_path: str, base: tuple[str, Manifest] | None
    ) -> tuple[str, Manifest | None, list[extents.Range] | None]:
        """The mode, the usable base manifest, and the changed ranges (mode "extents")."""
        if base is None:
            return "full", None, None
        base_path, bm = base
        if bm.block_size != self.block_size:
            log.info("base %s has another block size: full backup", bm.snapshot_id)
            return "full", None, None
        if self.store.head(manifest_key_name(bm.snapshot_id)) is None:
            log.info("base backup %s is gone from the target: full backup", bm.snapshot_id)
            return "full", None, None
        try:
            if not extents.shares_extents(os.path.dirname(os.path.abspath(image_path))):
                raise extents.ExtentMapUnsupported("the pool cannot share extents (no reflink)")
            ranges = extents.changed(base_path, image_path)
        except (extents.ExtentMapUnsupported, errors.NotFound, OSError) as exc:
            log.info(
                "incremental backup falls back to read-and-hash (extent maps not comparable: %s)",
                exc,
            )
            return "read-and-hash", bm, None
        return "extents", bm, ranges

    @staticmethod
    def _open_base(path: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.info("cannot read the local base %s (%s): blocks are not compared with it",
                     path, exc.strerror)
            return None

    def _backup(
        self,
        fd: int,
        image_path: str,
        record: SnapshotRecord,
        base: tuple[str, Manifest] | None,
        progress: ProgressFn | None,
        marker: _Marker,
        candidates: set[str],
    ) -> BackupResult:
        size = os.fstat(fd).st_size
        cs, bs = self.chunk_size, self.block_size
        mode, bm, changed = self._plan_base(image_path, base)
        try:
            alloc: list[extents.Range] | None = extents.allocated_extents(
                extents.fiemap_fd(fd), size
            )
        except extents.ExtentMapUnsupported:
            alloc = None
        alloc_starts = [r.offset for r in alloc] if alloc is not None else []
        changed_starts = [r.offset for r in changed] if changed is not None else []
        base_entries: list[ChunkRef] = bm.chunks if bm is not None else []
        base_starts = [c.offset for c in base_entries]
        known: set[str] = bm.chunk_ids() if bm is not None else set()
        manifest = Manifest(
            snapshot_id=record.snapshot_id,
            source_volume_id=record.source_volume_id,
            name=record.name,
            size=size,
            filesystem=record.filesystem,
            sector_size=record.sector_size,
            created=record.created or _now_rfc3339(),
            cluster_id=self.cluster_id,
            # entries taken from the base point into its chunks, which may be larger
            chunk_size=max(cs, bm.chunk_size) if bm is not None else cs,
            block_size=bs,
            base_snapshot_id=bm.snapshot_id if bm is not None else None,
        )
        result = BackupResult(manifest, mode)
        trusted: dict[str, bool] = {}

        def relies_on(cid: str) -> bool:
            """True when `cid` may be used without uploading it."""
            if cid in candidates:
                marker.claim(cid)
                self._wait_no_sweep(marker.server_now())
                return False  # re-upload: the sweep may have removed it
            return True

        # Without comparable extent maps, blocks are compared with the local base copy instead:
        # an equal block keeps the base's entry, so scattered changes upload only their blocks.
        base_fd = self._open_base(base[0]) if mode == "read-and-hash" and base else None

        def from_base(off: int, end: int) -> ChunkRef | None:
            """The base's bytes for [off, end) when one base entry covers them and may be
            relied on; None when the blocks must be read."""
            i = bisect.bisect_right(base_starts, off) - 1
            if i < 0 or base_entries[i].end < end:
                return None
            e = base_entries[i]
            if e.id is not None:
                if e.id not in trusted:
                    trusted[e.id] = relies_on(e.id)
                if not trusted[e.id]:
                    return None
            return e.slice(off, end)

        # The plan, block by block: a hole in the extent map, or unchanged since the base, needs
        # no read; runs of blocks to read inside one aligned region of the chunk size are read
        # together and become one chunk (or a few, split at all-zero blocks).
        Item = tuple[int, int, ChunkRef | None]
        plan: list[Item] = []
        for region in range(0, size, cs):
            region_end = min(region + cs, size)
            run: int | None = None
            for b in range(region, region_end, bs):
                b_end = min(b + bs, region_end)
                quick: ChunkRef | None = None
                if alloc is not None and not _overlaps(alloc, alloc_starts, b, b_end):
                    quick = ChunkRef(b, b_end - b, None)
                elif changed is not None and not _overlaps(changed, changed_starts, b, b_end):
                    quick = from_base(b, b_end)
                if quick is None:
                    run = b if run is None else run
                    continue
                if run is not None:
                    plan.append((run, b, None))
                    run = None
                plan.append((b, b_end, quick))
            if run is not None:
                plan.append((run, region_end, None))
        # Which chunks the target holds: one listing of chunks/, or a HEAD per chunk read. A LIST
        # page names 1,000 chunks but costs about as much as 75 HEADs (parsing its XML; measured
        # on SeaweedFS), so list only for backups that read many chunks, and give up (HEAD
        # instead) once the listing would cost more than the HEADs it saves.
        to_read = sum(1 for item in plan if item[2] is None)
        present = (
            self._present_chunks(limit=to_read * LIST_PER_HEAD) if to_read >= LIST_MIN else None
        )
        stats_lock = threading.Lock()
        entries: list[ChunkRef] = []
        done = 0

        def blocks(ref: ChunkRef) -> int:
            return -(-ref.length // bs)

        def unread(item: Item) -> list[tuple[str, ChunkRef]] | None:
            ref = item[2]
            if ref is None:
                return None
            return [("hole" if ref.id is None else "reused", ref)]

        def store_chunk(off: int, data: memoryview) -> tuple[str, ChunkRef]:
            cid = chunk_id(self.key, data)
            ref = ChunkRef(off, len(data), cid)
            name = chunk_key_name(cid)
            if cid in candidates:
                relies_on(cid)  # claimed; uploaded again below
            elif cid in known or (
                cid in present if present is not None else self.store.head(name) is not None
            ):
                return "reused", ref
            blob = seal_chunk(self.key, cid, data)
            self.store.put(name, blob)
            with stats_lock:
                result.uploaded_bytes += len(blob)
                result.uploaded_chunks += 1
            return "uploaded", ref

        def work(item: Item) -> list[tuple[str, ChunkRef]]:
            off, end, _ = item
            data = os.pread(fd, end - off, off)
            if len(data) != end - off:
                raise errors.Internal(f"short read from {image_path} at {off}")
            old = os.pread(base_fd, end - off, off) if base_fd is not None else b""
            with stats_lock:
                result.read_bytes += len(data) + len(old)
            view = memoryview(data)
            out: list[tuple[str, ChunkRef]] = []
            start: int | None = None  # of the current run of blocks to store
            for b in range(off, end, bs):
                b_end = min(b + bs, end)
                keep: tuple[str, ChunkRef] | None = None
                if data.startswith(
                    self._zero if b_end - b == bs else self._zero[: b_end - b], b - off
                ):
                    keep = ("hole", ChunkRef(b, b_end - b, None))
                elif len(old) >= b_end - off and data.startswith(old[b - off : b_end - off],
                                                                 b - off):
                    ref = from_base(b, b_end)
                    keep = ("reused", ref) if ref is not None else None
                if keep is None:
                    start = b if start is None else start
                    continue
                if start is not None:
                    out.append(store_chunk(start, view[start - off : b - off]))
                    start = None
                out.append(keep)
            if start is not None:
                out.append(store_chunk(start, view[start - off :]))
            return out

        def on_done(item: Item, res: list[tuple[str, ChunkRef]]) -> None:
            nonlocal done
            for kind, ref in res:
                if kind == "hole":
                    result.hole_chunks += blocks(ref)
                elif kind == "reused":
                    result.reused_chunks += blocks(ref)
                else:
                    faults.hit("backup-upload:chunk-stored")
                entries.append(ref)
                done += ref.length
            if progress is not None:
                progress(Progress("backup", done, size, result.uploaded_bytes))

        try:
            self._pipeline(plan, work, on_done, shortcut=unread)
        finally:
            if base_fd is not None:
                os.close(base_fd)
        manifest.chunks = merge_runs(entries)
        log.info(
            "backup %s (%s): %d bytes, read %d, uploaded %d in %d chunks, reused %d blocks, "
            "holes %d blocks",
            record.snapshot_id, mode, size, result.read_bytes, result.uploaded_bytes,
            result.uploaded_chunks, result.reused_chunks, result.hole_chunks,
        )
        return result

    # ---- restore ---------------------------------------------------------------------------

    def restore(
        self, snapshot_id: str, dest_path: str, progress: ProgressFn | None = None
    ) -> Manifest:
        """Restore a backup into a new sparse file at `dest_path`. Bytes go to
        `dest_path + ".stowage-partial"`; `dest_path + ".stowage-restore"` records which manifest
        entries are durable there, so a restart continues where the last run stopped. `dest_path`
        appears (rename) only when every chunk has been authenticated and written and the file
        synced."""
        try:
            return self._restore(snapshot_id, dest_path, progress)
        except OSError as exc:
            raise _local_error(exc, f"restoring to {dest_path}") from exc

    def _restore(
        self, snapshot_id: str, dest_path: str, progress: ProgressFn | None
    ) -> Manifest:
        m = self._manifest(check_snapshot_id(snapshot_id))  # wrong key: fails here
        if os.path.lexists(dest_path):
            raise errors.AlreadyExists(f"restore target {dest_path} already exists")
        tmp = dest_path + ".stowage-partial"
        state_path = dest_path + ".stowage-restore"
        ident = hashlib.sha256(json.dumps(m.to_json(), sort_keys=True).encode()).hexdigest()
        done: set[int] = set()
        try:
            with open(state_path, encoding="utf-8") as fh:
                st = json.load(fh)
            if (
                st.get("manifest") == ident
                and os.path.exists(tmp)
                and os.stat(tmp).st_size == m.size
            ):
                done = {int(o) for o in st.get("done", [])}
                log.info("resuming restore of %s: %d entries already written", snapshot_id,
                         len(done))
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            pass
        if not done:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        else:
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, m.size)
            # Each chunk is fetched once and written wherever the manifest places its bytes.
            todo = list(m.by_chunk(done).items())
            total = m.size
            progressed = sum(c.length for c in m.chunks if c.id is None or c.offset in done)
            pending: list[int] = []
            last_save = time.monotonic()
            # Checkpoints (fsync, then record the chunks written before it) run on their own
            # thread, so downloads go on while the disk catches up; one at a time.
            checkpointer = ThreadPoolExecutor(1, thread_name_prefix="restore-checkpoint")
            checkpoint: Future[None] | None = None

            def save(batch: list[int]) -> None:
                os.fsync(fd)
                done.update(batch)
                self._save_state(state_path, ident, snapshot_id, done)

            def fetch(group: tuple[str, list[ChunkRef]]) -> int:
                cid, refs = group
                try:
                    blob = self.store.get(chunk_key_name(cid))
                except errors.NotFound:
                    raise errors.DataLoss(
                        f"backup {snapshot_id}: chunk {cid} (offset {refs[0].offset}) is missing "
                        f"from target {self.store.target.name}"
                    ) from None
                data = memoryview(open_chunk(self.key, cid, blob, m.chunk_size))
                if not holds(m.version, refs, len(data)):
                    raise errors.DataLoss(f"backup chunk {cid} has the wrong length")
                for c in refs:
                    os.pwrite(fd, data[c.skip : c.skip + c.length], c.offset)
                return len(blob)

            transferred = 0

            def on_done(group: tuple[str, list[ChunkRef]], n: int) -> None:
                nonlocal progressed, transferred, last_save, checkpoint
                refs = group[1]
                pending.extend(c.offset for c in refs)
                faults.hit("backup-restore:chunk-written")
                progressed += sum(c.length for c in refs)
                transferred += n
                due = time.monotonic() - last_save > self.checkpoint_interval or len(pending) >= 256
                if due and (checkpoint is None or checkpoint.done()):
                    if checkpoint is not None:
                        checkpoint.result()  # a failed checkpoint fails the restore
                    checkpoint = checkpointer.submit(save, pending.copy())
                    pending.clear()
                    last_save = time.monotonic()
                if progress is not None:
                    progress(Progress("restore", progressed, total, transferred))

            try:
                try:
                    self._pipeline(todo, fetch, on_done)
                    if checkpoint is not None:
                        checkpoint.result()
                except BaseException:
                    if checkpoint is not None:
                        with contextlib.suppress(Exception):
                            checkpoint.result()
                    with contextlib.suppress(OSError):
                        save(pending)
                    raise
            finally:
                checkpointer.shutdown(wait=True)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest_path)
        dfd = os.open(os.path.dirname(os.path.abspath(dest_path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)
        log.info("restored backup %s to %s (%d bytes)", snapshot_id, dest_path, m.size)
        return m

    @staticmethod
    def _save_state(path: str, ident: str, snapshot_id: str, done: set[int]) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"snapshot_id": snapshot_id, "manifest": ident, "done": sorted(done)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    # ---- operator verbs --------------------------------------------------------------------

    def verify(self, snapshot_id: str, progress: ProgressFn | None = None) -> VerifyReport:
        """Download and authenticate every chunk of a backup; the damaged ones are listed."""
        m = self._manifest(check_snapshot_id(snapshot_id))
        refs = m.by_chunk()
        ids = sorted(refs)
        report = VerifyReport(snapshot_id, chunks=len(ids))

        def check(cid: str) -> str | None:
            try:
                blob = self.store.get(chunk_key_name(cid))
            except errors.NotFound:
                return "missing"
            try:
                data = open_chunk(self.key, cid, blob, m.chunk_size)
            except errors.DataLoss as exc:
                return str(exc)
            if not holds(m.version, refs[cid], len(data)):
                return f"backup chunk {cid} is shorter than the manifest's entries need"
            return None

        def on_done(cid: str, problem: str | None) -> None:
            if problem is None:
                report.verified += 1
            else:
                report.damaged[cid] = problem
            if progress is not None:
                n = report.verified + len(report.damaged)
                progress(Progress("verify", n, len(ids), 0))

        self._pipeline(ids, check, on_done)
        return report

    def list(self) -> list[SnapshotInfo]:
        return sorted(
            (SnapshotInfo(o.key[len("manifests/"):], o.modified)
             for o in self.store.list("manifests/")),
            key=lambda s: (s.modified, s.snapshot_id),
        )

    def show(self, snapshot_id: str) -> Manifest:
        return self._manifest(check_snapshot_id(snapshot_id))

    def delete(self, snapshot_id: str) -> None:
        """Remove a backup's manifest (idempotent); `gc()` reclaims its chunks later."""
        self.store.delete(manifest_key_name(check_snapshot_id(snapshot_id)))

    # ---- garbage collection ----------------------------------------------------------------

    def _referenced(self) -> set[str]:
        refs: set[str] = set()
        for info in self.list():
            try:
                refs |= self._manifest(info.snapshot_id).chunk_ids()
            except errors.NotFound:
                continue  # deleted since the listing: it references nothing any more
        return refs

    def _chunks(self) -> dict[str, tuple[int, float]]:
        return {
            o.key.rsplit("/", 1)[-1]: (o.size, o.modified) for o in self.store.list("chunks/")
        }

    def gc(self, min_candidate_age: float = 3600.0) -> GcReport:
        """One garbage collection pass: sweep (delete) the candidates of an earlier mark if that
        is old enough and safe, then mark the chunks no manifest references as new candidates.
        Run it periodically; a chunk is deleted at the earliest on the second pass that sees it
        unreferenced. See docs/backup-format.md for the protocol."""
        self._check_config(create=False)
        report = GcReport()
        if self.store.head(CANDIDATES_KEY) is not None:
            self._sweep(min_candidate_age, report)
            if report.postponed:
                return report
        self._mark(report)
        return report

    def _mark(self, report: GcReport) -> None:
        refs = self._referenced()
        chunks = self._chunks()
        cands = sorted(c for c in chunks if c not in refs)
        report.referenced_chunks = len(refs)
        report.candidates = len(cands)
        report.candidate_bytes = sum(chunks[c][0] for c in cands)
        if cands:
            self.store.put(CANDIDATES_KEY, json.dumps({"chunks": cands}).encode())
            faults.hit("backup-gc:marked")
        log.info("gc mark: %d chunks referenced, %d unreferenced (%d bytes) are candidates",
                 len(refs), len(cands), report.candidate_bytes)

    def _sweep(self, min_age: float, report: GcReport) -> None:
        t0 = time.monotonic()
        me = SWEEPING_PREFIX + uuid.uuid4().hex
        self.store.put(me, b"{}")
        try:
            self._sweep_fenced(me, min_age, report, t0)
        finally:
            self.store.delete(me)

    def _sweep_fenced(self, me: str, min_age: float, report: GcReport, t0: float) -> None:
        now_info = self.store.head(me)
        cands, t_mark = self._load_candidates()
        if now_info is None or t_mark is None:
            report.postponed = "the candidate list or the sweep marker vanished"
            return
        now = now_info.modified
        if now - t_mark < min_age:
            report.postponed = f"candidates are {now - t_mark:.0f}s old, need {min_age:.0f}s"
            return
        claims: set[str] = set()
        for o in self.store.list(MARKERS_PREFIX):
            if now - o.modified > self.stale_after:
                continue  # a writer that died: it never wrote a manifest
            try:
                doc = json.loads(self.store.get(o.key))
            except errors.NotFound:
                continue
            except ValueError:
                doc = {}
            started = doc.get("started") if isinstance(doc, dict) else None
            if not isinstance(started, int | float) or started < t_mark + CLOCK_MARGIN:
                report.postponed = (
                    "a backup that started before the candidate list is still running"
                )
                return
            claims.update(c for c in doc.get("claims", []) if isinstance(c, str))
        refs = self._referenced()
        chunks = self._chunks()
        victims = [
            c for c in sorted(cands)
            if c not in refs and c not in claims and c in chunks and chunks[c][1] < t_mark
        ]
        def on_deleted(c: str, _: None) -> None:
            report.deleted_chunks += 1
            report.deleted_bytes += chunks[c][0]
            faults.hit("backup-gc:chunk-deleted")

        batch = 8 * self.workers
        for i in range(0, len(victims), batch):
            if time.monotonic() - t0 > self.stale_after / 2:
                report.postponed = "the sweep ran too long; the rest waits for the next pass"
                break
            self._pipeline(
                victims[i : i + batch], lambda c: self.store.delete(chunk_key_name(c)), on_deleted
            )
        if not report.postponed:
            self.store.delete(CANDIDATES_KEY)
            report.swept = True
        log.info("gc sweep: deleted %d chunks (%d bytes)", report.deleted_chunks,
                 report.deleted_bytes)
        # Markers of writers long dead are removed too.
        for o in self.store.list(MARKERS_PREFIX):
            if now - o.modified > 4 * self.stale_after:
                self.store.delete(o.key)
