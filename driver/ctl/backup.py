"""`stowagectl backup …`: a backup target's repository, without a driver or Kubernetes (disaster
recovery, audits, garbage collection). Targets, key and credentials as the driver takes them:
`--backup-target` (or $STOWAGE_BACKUP_TARGET), `--backup-key-file` (or
$STOWAGE_BACKUP_KEY_FILE), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from driver import errors, ids
from driver.host import memory

FORMS = "NAME=s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]"


def add_parser(sub: Any, duration: Any) -> None:
    bk = sub.add_parser(
        "backup", help="off-node backups in a target, without a driver (docs/backup.md)"
    ).add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        env_target = os.environ.get("STOWAGE_BACKUP_TARGET", "")
        p.add_argument("--backup-target", action="append", metavar=FORMS,
                       default=[env_target] if env_target else [],
                       help="a target as the driver's flag (repeatable; $STOWAGE_BACKUP_TARGET)")
        p.add_argument("--backup-key-file",
                       default=os.environ.get("STOWAGE_BACKUP_KEY_FILE", ""),
                       help="the repository key ($STOWAGE_BACKUP_KEY_FILE)")
        p.add_argument("--target", default="", help="which target (needed with several)")
        p.add_argument("--workers", type=int, default=4)

    for name, help_ in (("list", "every backup in the target"),
                        ("gc", "one garbage-collection pass (mark, or sweep then mark)")):
        p = bk.add_parser(name, help=help_)
        common(p)
        if name == "gc":
            p.add_argument("--min-age", type=duration, default=3600.0,
                           help="candidates must be this old before a sweep deletes them")
    for name, help_ in (("show", "a backup's manifest (summary)"),
                        ("verify", "download and authenticate every chunk"),
                        ("delete", "remove a backup's manifest (gc reclaims its chunks)")):
        p = bk.add_parser(name, help=help_)
        common(p)
        every = " (default: every backup)" if name == "verify" else ""
        p.add_argument("snapshot", nargs="*" if name == "verify" else None,
                       help="snapshot ID" + every)
    pr = bk.add_parser(
        "prune", help="keep the newest N backups of each volume, delete the older manifests"
    )
    common(pr)
    pr.add_argument("--keep-last", type=int, required=True, metavar="N")
    pr.add_argument("--volume", default="", help="only the backups of this source volume")
    pr.add_argument(
        "--cluster-id", default=os.environ.get("STOWAGE_CLUSTER_ID") or "default",
        help="only backups this cluster owns ($STOWAGE_CLUSTER_ID or 'default', as the driver)",
    )
    pr.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    st = bk.add_parser(
        "status", help="a node's backup uploads from its pool's records: phase, bytes done / total"
    )
    st.add_argument("--pool-dir", required=True)
    r = bk.add_parser("restore", help="write a backup's image to a file (sparse, verified)")
    common(r)
    r.add_argument("snapshot")
    r.add_argument("--to", required=True, help="the image file to write (must not exist)")


def _repo(args: argparse.Namespace, snapshot: str = "") -> Any:
    from driver.backup import Repository
    from driver.core.backups import load_config

    if not args.backup_target:
        raise errors.InvalidArgument(f"--backup-target {FORMS} is required")
    targets, key, creds = load_config(args.backup_target, args.backup_key_file)
    name = args.target or (ids.backup_target(snapshot) if snapshot else "") or ""
    if not name:
        if len(targets) != 1:
            raise errors.InvalidArgument(f"--target is required: one of {', '.join(targets)}")
        name = next(iter(targets))
    if name not in targets:
        raise errors.InvalidArgument(
            f"target {name!r} is not given by --backup-target (given: {', '.join(targets)})"
        )
    return Repository.open(targets[name], key, "", workers=args.workers, credentials=creds)


def upload_status(pool_dir: str) -> list[dict[str, Any]]:
    """Every backup snapshot the node's store knows, with its upload's progress (written by the
    driver every few seconds while it runs). Opens meta.db read-only: the driver may run."""
    from driver.storage.store import Store

    store = Store(os.path.join(os.path.realpath(pool_dir), "meta.db"), readonly=True)
    try:
        states = store.backups()
    finally:
        store.close()
    now = time.time()
    return [{"snapshot": b.snapshot_id, "target": b.target, "phase": b.phase.value,
             "done": b.done_bytes, "total": b.total_bytes,
             "percent": round(100 * b.done_bytes / b.total_bytes, 1) if b.total_bytes else 0.0,
             "updated": f"{max(now - b.updated_at, 0):.0f}s ago",
             "error": f"{b.error_code}: {b.error}" if b.error else ""} for b in states]


def _progress(what: str) -> Any:
    last = [0.0]
    t0 = time.monotonic()

    def report(p: Any) -> None:
        now = time.monotonic()
        if now - last[0] < 2 and p.done_bytes < p.total_bytes:
            return
        last[0] = now
        rate = p.transferred_bytes / max(now - t0, 1e-3) / (1 << 20)
        print(f"{what}: {p.done_bytes} of {p.total_bytes} ({rate:.1f} MiB/s)", file=sys.stderr)

    return report


def main(args: argparse.Namespace, emit: Any) -> int:
    """Run a `backup` action; `emit(data, rows, columns)` prints in the chosen format."""
    from driver import faults

    faults.configure()  # STOWAGE_FAULTS, as in the driver: the crash tests of gc
    memory.keep_large_buffers()  # as the driver does for its backup data path
    if args.action == "status":
        rows = upload_status(args.pool_dir)
        emit(rows, rows, ("snapshot", "target", "phase", "done", "total", "percent", "updated",
                          "error"))
        return 1 if any(r["phase"] == "failed" for r in rows) else 0
    snapshot = args.snapshot if isinstance(getattr(args, "snapshot", None), str) else ""
    repo = _repo(args, snapshot)
    if args.action == "list":
        rows = [{"snapshot": s.snapshot_id,
                 "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.modified))}
                for s in repo.list()]
        emit(rows, rows, ("snapshot", "modified"))
    elif args.action == "show":
        m = repo.show(snapshot).to_json()
        chunks = m.pop("chunks")
        m["stored_chunks"] = len({c[2] for c in chunks if c[2] is not None})
        m["data_bytes"] = sum(c[1] for c in chunks if c[2] is not None)  # not holes
        emit(m, None, ())
    elif args.action == "verify":
        wanted = args.snapshot or [s.snapshot_id for s in repo.list()]
        rows, bad = [], 0
        for sid in wanted:
            rep = repo.verify(sid)
            bad += not rep.ok
            rows.append({"snapshot": sid, "chunks": rep.chunks, "verified": rep.verified,
                         "state": "ok" if rep.ok else "DAMAGED",
                         "damaged": dict(sorted(rep.damaged.items())[:5])})
        emit(rows, rows, ("snapshot", "chunks", "verified", "state", "damaged"))
        return 1 if bad else 0
    elif args.action == "delete":
        repo.delete(snapshot)
        print(f"deleted backup {snapshot} (its chunks are reclaimed by gc)")
    elif args.action == "prune":
        from driver.core.backups import prune_plan

        listed = []
        for s in repo.list():
            try:
                listed.append(repo.show(s.snapshot_id))
            except errors.NotFound:
                continue  # deleted since the listing
        doomed = prune_plan(listed, args.keep_last, args.cluster_id, args.volume)
        rows = [{"snapshot": m.snapshot_id, "volume": m.source_volume_id, "created": m.created,
                 "action": "would delete" if args.dry_run else "deleted"} for m in doomed]
        for m in doomed:
            if not args.dry_run:
                repo.delete(m.snapshot_id)
        emit(rows, rows, ("snapshot", "volume", "created", "action"))
    elif args.action == "gc":
        rep = repo.gc(min_candidate_age=args.min_age)
        emit(vars(rep), None, ())
    elif args.action == "restore":
        to = os.path.abspath(args.to)
        m = repo.restore(snapshot, to, progress=_progress("restore"))
        print(f"restored {snapshot} to {to}: {m.size} bytes, "
              f"{'filesystem ' + m.filesystem if m.filesystem else 'raw block image'}")
    return 0
