"""Backup snapshots on this node: the configured targets, the bounded pool of background uploads
and restores, and their state (docs/design.md, "Backups"; docs/backup.md).

An upload is a job keyed by its snapshot ID, a restore one keyed by its volume ID. At most
`max_concurrent` jobs run at once; each moves `workers` chunks in parallel, all of the node's
transfers sharing one optional rate limit. Upload state is in the metadata store (`backups`
table), so a restarted driver resumes what was pending; a restore's progress is in the engine's
own partial files, so the CO's next CreateVolume continues it.

With `--backup-verify-interval` a scrub thread re-reads and authenticates the newest backup of
every volume each interval, sharing the node's rate limit. Every job feeds the backup metrics
(driver/metrics.py) and logs its progress (bytes done / total, rate) while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime

from driver import errors, faults, ids
from driver.backup import (
    Credentials,
    Manifest,
    Progress,
    Repository,
    RepositoryKey,
    SnapshotRecord,
    Store,
    Target,
    parse_targets,
)
from driver.backup.s3 import RateLimiter
from driver.core.pool import PoolContext
from driver.metrics import BackupMetrics
from driver.model import AccessType, BackupPhase, FsType, Snapshot

log = logging.getLogger(__name__)

#: How often the upload progress is written to the store (seconds).
PROGRESS_INTERVAL = 2.0
#: S3 attempts per request (first try included), with botocore's exponential backoff; the CO's
#: retries of CreateSnapshot / CreateVolume restart a job that still failed.
MAX_ATTEMPTS = 3

# The domain errors a job's failure is stored as (most specific first), rebuilt on the retry.
_KINDS: tuple[type[errors.StowageError], ...] = (
    errors.InvalidArgument,
    errors.NotFound,
    errors.AlreadyExists,
    errors.FailedPrecondition,
    errors.ResourceExhausted,
    errors.Aborted,
    errors.Unavailable,
    errors.PermissionDenied,
    errors.DataLoss,
    errors.Internal,
)


def error_code(exc: BaseException) -> str:
    for kind in _KINDS:
        if isinstance(exc, kind):
            return kind.__name__
    return errors.Internal.__name__


def rebuild_error(code: str, message: str) -> errors.StowageError:
    kind = next((k for k in _KINDS if k.__name__ == code), errors.Internal)
    return kind(message)


def load_config(
    specs: Sequence[str], key_file: str
) -> tuple[dict[str, Target], RepositoryKey, Credentials]:
    """The parsed targets, the key and the credentials, or the one reason they are unusable.
    Messages name files and target names, never a key or a secret."""
    targets = parse_targets(list(specs))
    if not key_file:
        raise errors.InvalidArgument(
            f"backup target(s) {', '.join(sorted(targets))} need --backup-key-file: backups "
            "are always encrypted"
        )
    key = RepositoryKey.load(key_file)
    return targets, key, Credentials.from_env()


def open_repositories(
    specs: Sequence[str], key_file: str, *, cluster_id: str, workers: int = 4, rate_limit: int = 0
) -> dict[str, Repository]:
    """One repository per configured target, all sharing one optional rate limit: what node
    mode (`Backups`) and controller mode (`driver.core.remote`) both open."""
    targets, key, creds = load_config(specs, key_file)
    limiter = RateLimiter(rate_limit or None)  # one budget for every target of the process
    repos = {}
    for name, target in targets.items():
        store = Store(target, creds, max_connections=workers + 4, max_attempts=MAX_ATTEMPTS)
        store.limiter = limiter
        repos[name] = Repository(store, key, cluster_id=cluster_id, workers=workers)
    log.info(
        "backup targets: %s (key ID %s, cluster %s, %d transfers each%s)",
        ", ".join(f"{t.name}={t.spec}" for t in targets.values()), key.key_id, cluster_id,
        workers, f", {rate_limit} bytes/s" if rate_limit else "",
    )
    return repos


def delete_manifest(repo: Repository | None, snapshot_id: str, cluster_id: str) -> None:
    """Remove a backup's manifest from its target (its chunks are left to `gc`), unless the
    manifest belongs to another cluster (an imported backup: never deleted from here). `repo`
    is None when this process lacks the target the ID names: logged, nothing removed."""
    if repo is None:
        log.warning(
            "DeleteSnapshot %s: target %r is not configured here; its manifest, if any, stays "
            "(stowagectl backup delete removes it)", snapshot_id, ids.backup_target(snapshot_id),
        )
        return
    try:
        m = repo.show(snapshot_id)
    except errors.NotFound:
        return
    if m.cluster_id != cluster_id:
        log.warning(
            "DeleteSnapshot %s: the backup belongs to cluster %r, not %r; only the local "
            "record is removed, the backup stays", snapshot_id, m.cluster_id, cluster_id,
        )
        return
    repo.delete(snapshot_id)
    log.info("deleted backup manifest %s from target %s", snapshot_id, repo.store.target.name)
def rate_text(done: int, seconds: float) -> str:
    """A transfer rate for progress lines: `12.3 MiB/s`."""
    return f"{done / max(seconds, 1e-3) / (1 << 20):.1f} MiB/s"


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def origin_of(m: Manifest) -> Snapshot:
    """What a backup restores, as a snapshot: a filesystem image when the manifest names a
    filesystem, a raw block image otherwise."""
    try:
        fs_type = FsType.stored(m.filesystem)
    except ValueError:
        raise errors.FailedPrecondition(
            f"backup {m.snapshot_id} holds a {m.filesystem!r} filesystem, which this driver "
            "does not make"
        ) from None
    created = 0.0
    with contextlib.suppress(ValueError):
        created = datetime.strptime(m.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    return Snapshot(
        id=m.snapshot_id,
        name=m.name,
        source_volume_id=m.source_volume_id,
        size=m.size,
        fs_type=fs_type,
        access_type=AccessType.MOUNT if fs_type else AccessType.BLOCK,
        formatted=fs_type is not None,
        created_at=created,
        ready=True,
        sector_size=m.sector_size,
    )


def prune_plan(
    manifests: Iterable[Manifest], keep_last: int, cluster_id: str, volume: str = ""
) -> list[Manifest]:
    """The backups a keep-last-N retention removes: per source volume, every backup owned by
    `cluster_id` but the newest `keep_last` (by creation time, then ID). Another cluster's
    backups are neither removed nor counted; `volume` limits the plan to one source volume."""
    if keep_last < 1:
        raise errors.InvalidArgument("--keep-last must be at least 1 (0 would remove them all)")
    by_volume: dict[str, list[Manifest]] = {}
    for m in manifests:
        if m.cluster_id == cluster_id and (not volume or m.source_volume_id == volume):
            by_volume.setdefault(m.source_volume_id, []).append(m)
    doomed: list[Manifest] = []
    for _, ms in sorted(by_volume.items()):
        ms.sort(key=lambda m: (m.created, m.snapshot_id), reverse=True)
        doomed.extend(ms[keep_last:])
    return doomed


@dataclass
class _Job:
    future: Future[None]
    done_bytes: int = 0
    total_bytes: int = 0
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)


class Backups:
    def __init__(
        self,
        ctx: PoolContext,
        repos: Mapping[str, Repository],
        *,
        max_concurrent: int = 2,
        metrics: BackupMetrics | None = None,
    ) -> None:
        self.ctx = ctx
        self.repos = dict(repos)
        self.metrics = metrics or BackupMetrics()
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="backup-job")
        self._lock = threading.Lock()
        self._uploads: dict[str, _Job] = {}
        self._restores: dict[str, _Job] = {}
        self._closing = False
        self._stop = threading.Event()
        self._scrubber: threading.Thread | None = None
        newest: dict[str, float] = {}  # the freshness gauges survive a restart
        for st in ctx.store.backups(BackupPhase.DONE):
            snap = ctx.store.get_snapshot(st.snapshot_id)
            if snap is not None:
                vol = snap.source_volume_id
                newest[vol] = max(newest.get(vol, 0.0), st.updated_at)
        for vol, t in newest.items():
            self.metrics.last_success.labels(vol).set(t)

    @classmethod
    def open(
        cls,
        ctx: PoolContext,
        specs: Sequence[str],
        key_file: str,
        *,
        cluster_id: str,
        workers: int = 4,
        max_concurrent: int = 2,
        rate_limit: int = 0,
        metrics: BackupMetrics | None = None,
    ) -> Backups:
        repos = open_repositories(
            specs, key_file, cluster_id=cluster_id, workers=workers, rate_limit=rate_limit
        )
        log.info("%d backup jobs at once on this node", max_concurrent)
        return cls(ctx, repos, max_concurrent=max_concurrent, metrics=metrics)

    # --- targets ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.repos)

    def repo(self, target: str) -> Repository:
        repo = self.repos.get(target)
        if repo is None:
            raise errors.NotFound(
                f"backup target {target!r} is not configured on node {self.ctx.node_id} "
                f"(configured: {', '.join(self.names()) or 'none'})"
            )
        return repo

    def repo_of(self, snapshot_id: str) -> Repository | None:
        """The repository a backup snapshot ID names, None when this node lacks its target."""
        target = ids.backup_target(snapshot_id)
        return self.repos.get(target) if target else None

    def manifest(self, snapshot_id: str) -> Manifest:
        repo = self.repo_of(snapshot_id)
        if repo is None:
            raise errors.NotFound(
                f"snapshot {snapshot_id} names backup target {ids.backup_target(snapshot_id)!r}, "
                f"which is not configured on node {self.ctx.node_id}"
            )
        return repo.show(snapshot_id)

    # --- uploads ------------------------------------------------------------------------------
    def start_upload(self, snapshot_id: str) -> None:
        """Queue the upload of a backup snapshot unless one is queued or running."""
        with self._lock:
            job = self._uploads.get(snapshot_id)
            if self._closing or (job is not None and not job.future.done()):
                return
            job = _Job(Future())
            self._uploads[snapshot_id] = job
            job.future = self._executor.submit(self._upload, snapshot_id, job)

    def progress(self, snapshot_id: str) -> tuple[int, int] | None:
        with self._lock:
            job = self._uploads.get(snapshot_id) or self._restores.get(snapshot_id)
        return (job.done_bytes, job.total_bytes) if job is not None else None

    def cancel_upload(self, snapshot_id: str, wait: float = 60.0) -> None:
        """Stop an upload (at its next chunk) and wait for it to end: DeleteSnapshot must not
        race a manifest being written."""
        with self._lock:
            job = self._uploads.get(snapshot_id)
            if job is None:
                return
            job.cancelled = True
        job.future.cancel()  # still queued: it never starts
        try:
            job.future.result(timeout=wait)
        except FutureTimeout:
            raise errors.Aborted(
                f"the upload of {snapshot_id} is still stopping; retry the delete"
            ) from None
        except BaseException:  # noqa: BLE001, S110 - cancelled, or the job recorded its outcome
            pass
        with self._lock:
            self._uploads.pop(snapshot_id, None)

    def _upload(self, snapshot_id: str, job: _Job) -> None:
        store = self.ctx.store
        running = self.metrics.in_progress.labels("upload")
        running.inc()
        try:
            self._upload_once(snapshot_id, job)
        except Exception as exc:  # every failure is recorded, and reported on the next call
            if job.cancelled or self._closing or store.backup(snapshot_id) is None:
                log.info("upload of %s stopped: %s", snapshot_id, exc)
                return
            self.metrics.failures.labels("upload", error_code(exc)).inc()
            if not isinstance(exc, errors.StowageError):
                log.exception("upload of %s failed unexpectedly", snapshot_id)
            else:
                log.warning("upload of %s failed: %s", snapshot_id, exc)
            store.set_backup(
                snapshot_id, BackupPhase.FAILED, error_code=error_code(exc), error=str(exc)
            )
        finally:
            running.dec()

    def _upload_once(self, snapshot_id: str, job: _Job) -> None:
        store, backend = self.ctx.store, self.ctx.backend
        snap, state = store.get_snapshot(snapshot_id), store.backup(snapshot_id)
        if snap is None or state is None:
            return  # deleted since it was queued
        repo = self.repo(state.target)
        job.total_bytes = snap.size
        store.set_backup(snapshot_id, BackupPhase.UPLOADING, done_bytes=0, total_bytes=snap.size)
        base: tuple[str, Manifest] | None = None
        prior = store.backup_base(snap.source_volume_id, state.target, exclude=snapshot_id)
        if prior is not None and backend.snapshot_exists(prior.id):
            try:
                base = (backend.snapshot_path(prior.id), repo.show(prior.id))
            except errors.NotFound:
                base = None  # deleted from the target: a full backup
        last = time.monotonic()

        def on_progress(p: Progress) -> None:
            nonlocal last
            if job.cancelled or self._closing:
                raise errors.Aborted(f"the upload of {snapshot_id} was stopped")
            job.done_bytes, job.total_bytes = p.done_bytes, p.total_bytes
            if time.monotonic() - last >= PROGRESS_INTERVAL:
                last = time.monotonic()
                log.info("uploading %s: %d of %d bytes (%d sent, %s)", snapshot_id, p.done_bytes,
                         p.total_bytes, p.transferred_bytes,
                         rate_text(p.done_bytes, last - job.started))
                store.set_backup(
                    snapshot_id, BackupPhase.UPLOADING, done_bytes=p.done_bytes,
                    total_bytes=p.total_bytes,
                )

        record = SnapshotRecord(
            snapshot_id,
            snap.source_volume_id,
            name=snap.name,
            filesystem=str(snap.fs_type or "") if snap.formatted else "",
            sector_size=snap.sector_size,
            created=_rfc3339(snap.created_at),
        )
        t0 = time.monotonic()
        result = repo.backup(
            backend.snapshot_path(snapshot_id), record, base=base, progress=on_progress
        )
        faults.hit("backup-upload:manifest-written")
        if store.get_snapshot(snapshot_id) is None:  # deleted while the manifest was written
            repo.delete(snapshot_id)
            return
        store.set_backup(
            snapshot_id, BackupPhase.DONE, done_bytes=snap.size, total_bytes=snap.size
        )
        took = time.monotonic() - t0
        m = self.metrics
        m.read_bytes.labels(state.target).inc(result.read_bytes)
        m.uploaded_bytes.labels(state.target).inc(result.uploaded_bytes)
        m.duration.labels("upload").observe(took)
        m.last_success.labels(snap.source_volume_id).set(time.time())
        if not state.keep_local:
            self._drop_local(snapshot_id)
        log.info(
            "backup %s of %s is durable in target %s (%s, read %d bytes, uploaded %d, %.1fs, %s)",
            snapshot_id, snap.source_volume_id, state.target,
            result.mode if not result.already_done else "already there",
            result.read_bytes, result.uploaded_bytes, took, rate_text(result.read_bytes, took),
        )

    def _drop_local(self, snapshot_id: str) -> None:
        """The class asked not to keep the local copy: remove it now that the backup is
        durable (the row stays; restores then download). Kept if something is using it."""
        try:
            with self.ctx.locks.hold(snapshot_id):
                self.ctx.backend.delete_snapshot(snapshot_id)
        except errors.Aborted:
            log.info("local copy of %s is in use; it stays", snapshot_id)
            return
        log.info("dropped the local copy of %s (backup-keep-local: false)", snapshot_id)

    def delete_remote(self, snapshot_id: str, cluster_id: str) -> None:
        """Remove a backup's manifest unless another cluster owns it (`delete_manifest`)."""
        delete_manifest(self.repo_of(snapshot_id), snapshot_id, cluster_id)

    # --- restores -----------------------------------------------------------------------------
    def restore(
        self,
        volume_id: str,
        snapshot_id: str,
        finish: Callable[[], None],
        wait: float,
    ) -> None:
        """Download backup `snapshot_id` into the restore image of `volume_id` in the background
        (resumable), then call `finish` (which adopts and records the volume). Returns once the
        whole restore finished within `wait` seconds; Aborted, with the progress, while it runs;
        the job's error when it failed (the next call starts it again, where it stopped)."""
        with self._lock:
            job = self._restores.get(volume_id)
            if job is None:
                if self._closing:
                    raise errors.Unavailable("the driver is stopping")
                job = _Job(Future())
                self._restores[volume_id] = job
                job.future = self._executor.submit(
                    self._restore, volume_id, snapshot_id, finish, job
                )
        try:
            job.future.result(timeout=wait)
        except FutureTimeout:
            raise errors.Aborted(
                f"restoring backup {snapshot_id} into {volume_id}: {job.done_bytes} of "
                f"{job.total_bytes or '?'} bytes; the restore continues, retry"
            ) from None
        except BaseException:
            with self._lock:
                if self._restores.get(volume_id) is job:
                    del self._restores[volume_id]
            raise
        with self._lock:
            if self._restores.get(volume_id) is job:
                del self._restores[volume_id]

    def _restore(
        self, volume_id: str, snapshot_id: str, finish: Callable[[], None], job: _Job
    ) -> None:
        running = self.metrics.in_progress.labels("restore")
        running.inc()
        try:
            self._restore_once(volume_id, snapshot_id, finish, job)
        except Exception as exc:
            self.metrics.failures.labels("restore", error_code(exc)).inc()
            raise
        finally:
            running.dec()

    def _restore_once(
        self, volume_id: str, snapshot_id: str, finish: Callable[[], None], job: _Job
    ) -> None:
        repo = self.repo_of(snapshot_id)
        if repo is None:
            raise errors.NotFound(f"the target of {snapshot_id} is not configured on this node")
        dest = self.ctx.backend.restore_path(volume_id)
        last = time.monotonic()
        fetched = 0

        def on_progress(p: Progress) -> None:
            nonlocal last, fetched
            if self._closing:
                raise errors.Unavailable("the driver is stopping; the restore resumes later")
            job.done_bytes, job.total_bytes = p.done_bytes, p.total_bytes
            fetched = p.transferred_bytes
            if time.monotonic() - last >= PROGRESS_INTERVAL:
                last = time.monotonic()
                log.info("restoring %s into %s: %d of %d bytes (%s)", snapshot_id, volume_id,
                         p.done_bytes, p.total_bytes, rate_text(p.done_bytes, last - job.started))

        if not os.path.exists(dest):  # else: downloaded and verified, not yet adopted
            t0 = time.monotonic()
            try:
                m = repo.restore(snapshot_id, dest, progress=on_progress)
            finally:
                self.metrics.downloaded_bytes.labels(repo.store.target.name).inc(fetched)
            took = time.monotonic() - t0
            self.metrics.duration.labels("restore").observe(took)
            log.info("restored backup %s (%d bytes) for %s in %.1fs (%s)", snapshot_id, m.size,
                     volume_id, took, rate_text(m.size, took))
        faults.hit("backup-restore:image-ready")
        finish()

    # --- scrub -------------------------------------------------------------------------------
    def newest_backups(self) -> dict[str, tuple[str, str]]:
        """Volume ID -> (snapshot ID, target) of its newest durable backup."""
        store = self.ctx.store
        newest: dict[str, tuple[float, str, str]] = {}
        for st in store.backups(BackupPhase.DONE):
            snap = store.get_snapshot(st.snapshot_id)
            if snap is None:
                continue
            best = newest.get(snap.source_volume_id)
            if best is None or (snap.created_at, snap.id) > (best[0], best[1]):
                newest[snap.source_volume_id] = (snap.created_at, snap.id, st.target)
        return {vol: (sid, target) for vol, (_, sid, target) in newest.items()}

    def scrub(self) -> dict[str, bool]:
        """Download and authenticate the newest durable backup of every volume once. Returns
        volume ID -> intact; a volume whose target could not be read is left out (retried at
        the next pass). Damage is logged with the chunks it names."""
        results: dict[str, bool] = {}
        for vol, (sid, target) in sorted(self.newest_backups().items()):
            if self._stop.is_set():
                break
            repo = self.repos.get(target)
            if repo is None:
                continue
            t0 = time.monotonic()
            last = t0

            def on_progress(p: Progress, sid: str = sid, t0: float = t0) -> None:
                nonlocal last
                if self._stop.is_set():
                    raise errors.Aborted("the driver is stopping; the scrub resumes next time")
                if time.monotonic() - last >= PROGRESS_INTERVAL:
                    last = time.monotonic()
                    log.info("verifying %s: %d of %d chunks (%.0fs)", sid, p.done_bytes,
                             p.total_bytes, last - t0)

            try:
                report = repo.verify(sid, progress=on_progress)
                damaged = dict(report.damaged)
            except (errors.NotFound, errors.DataLoss) as exc:  # the manifest itself is gone
                damaged = {"manifest": str(exc)}
            except errors.StowageError as exc:
                if not self._stop.is_set():
                    self.metrics.failures.labels("verify", error_code(exc)).inc()
                    log.warning("verify of %s (volume %s) could not run: %s", sid, vol, exc)
                continue
            took = time.monotonic() - t0
            m = self.metrics
            m.duration.labels("verify").observe(took)
            m.last_verify.labels(vol).set(time.time())
            m.last_verify_ok.labels(vol).set(0 if damaged else 1)
            results[vol] = not damaged
            if damaged:
                m.damaged_chunks.labels(target).inc(len(damaged))
                some = ", ".join(f"{c}: {why}" for c, why in sorted(damaged.items())[:5])
                log.error("backup %s of volume %s is DAMAGED (%d chunks): %s", sid, vol,
                          len(damaged), some)
            else:
                log.info("verified backup %s of volume %s: %d chunks intact in %.1fs", sid, vol,
                         report.chunks, took)
        return results

    def start_scrub(self, interval: float) -> None:
        """Run `scrub()` every `interval` seconds (the first pass one interval after start-up)
        until `close()`."""
        if interval <= 0 or self._scrubber is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.scrub()
                except Exception:  # a failed pass must not end the scrubs
                    log.exception("backup scrub pass failed")

        self._scrubber = threading.Thread(target=loop, name="backup-scrub", daemon=True)
        self._scrubber.start()
        log.info("verifying the newest backup of every volume every %.0fs", interval)

    # --- start-up and shutdown ----------------------------------------------------------------
    def resume(self) -> int:
        """Queue every upload the store says is not finished, failed ones included (the driver
        restarted); a backup snapshot adopted without its upload state gets one. Returns how
        many were queued."""
        store = self.ctx.store
        for snap in store.list_snapshots():
            target = ids.backup_target(snap.id)
            if target and store.backup(snap.id) is None:
                store.ensure_backup(snap.id, target, snap.size)
        queued = 0
        # Failed ones too: the configuration may have been fixed, and an error from before the
        # restart is not worth answering to the CO's next call.
        for st in store.backups(BackupPhase.PENDING, BackupPhase.UPLOADING, BackupPhase.FAILED):
            if st.target not in self.repos:
                store.set_backup(
                    st.snapshot_id, BackupPhase.FAILED, error_code="FailedPrecondition",
                    error=f"backup target {st.target!r} is no longer configured on this node",
                )
                continue
            self.start_upload(st.snapshot_id)
            queued += 1
        if queued:
            log.info("resuming %d unfinished backup upload(s)", queued)
        return queued

    def close(self) -> None:
        """Stop the jobs at their next chunk (state stays for the next start) and wait."""
        with self._lock:
            self._closing = True
        self._stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._scrubber is not None:
            self._scrubber.join()
