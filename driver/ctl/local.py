"""stowagectl commands that work on a node's pool directly, without the driver's socket:
`check` (read-only), `gc` (reclaims old trash) and `pool rebuild` (a new meta.db from the
images' own records; the driver must be stopped)."""

from __future__ import annotations

import os
import sys

from driver import flags
from driver.core.check import Findings, inspect
from driver.core.rebuild import rebuild_pool_dir, store_state
from driver.ctl import output
from driver.errors import StowageError
from driver.host.base import Host
from driver.host.loop import LoopManager
from driver.storage import identity
from driver.storage.image import ImagePool
from driver.storage.store import Store


class CannotCheck(Exception):
    """The pool could not be inspected at all (exit status 2)."""


def duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d`, `2w` → seconds."""
    return flags.duration(text)


def _pool_uuid(pool_dir: str) -> str:
    try:
        record = identity.read_identity(pool_dir)
    except StowageError as exc:
        raise CannotCheck(str(exc)) from exc
    if record is not None:
        return record.uuid
    if not os.path.exists(os.path.join(pool_dir, identity.META_DB)):
        raise CannotCheck(f"{pool_dir} is not a Stowage pool (no pool.json, no meta.db)")
    return ""  # a pool made before identities: the driver adopts it at its next start


def check(pool_dir: str, host: Host, loops: LoopManager) -> Findings:
    """Everything check finds; CannotCheck when the pool or its store cannot be read. The
    mount table and the loop devices are read through `host` and `loops` (the entry point
    passes the real ones)."""
    pool_dir = os.path.realpath(pool_dir)
    if not os.path.isdir(pool_dir):
        raise CannotCheck(f"pool directory {pool_dir} does not exist")
    pool_uuid = _pool_uuid(pool_dir)
    state = store_state(pool_dir, pool_uuid)
    if state == "missing":
        raise CannotCheck(
            f"{pool_dir} has no meta.db: the driver rebuilds it from the images' records at "
            f"start, or run `stowagectl pool rebuild --pool-dir {pool_dir}`"
        )
    if state != "ok":
        raise CannotCheck(state)
    try:
        store = Store(os.path.join(pool_dir, identity.META_DB), readonly=True)
    except StowageError as exc:
        raise CannotCheck(str(exc)) from exc
    try:
        backend = ImagePool(pool_dir, inspect_only=True, pool_uuid=pool_uuid)
        found = inspect(store, backend, loops, host)
    except StowageError as exc:
        raise CannotCheck(str(exc)) from exc
    finally:
        store.close()
    if not pool_uuid:
        found.notes.append("no pool.json yet: the driver gives the pool its identity at start")
    else:
        found.notes.append(f"pool {pool_uuid}")
    return found


def check_main(pool_dir: str, fmt: str, host: Host, loops: LoopManager) -> int:
    """Exit status 0: consistent; 1: problems found; 2: could not check."""
    try:
        found = check(pool_dir, host, loops)
    except CannotCheck as exc:
        if fmt == "table":
            print(f"stowagectl: cannot check {pool_dir}: {exc}", file=sys.stderr)
        else:
            data = {"ok": False, "checked": False, "error": str(exc)}
            print(output.emit(fmt, data))
        return 2
    if fmt != "table":
        data = {"ok": found.ok, "checked": True, "problems": found.problems, "notes": found.notes}
        print(output.emit(fmt, data))
    else:
        for line in found.problems:
            print(f"PROBLEM {line}")
        for line in found.notes:
            print(f"note    {line}")
        print("consistent" if found.ok else f"{len(found.problems)} problem(s)")
    return 0 if found.ok else 1


def gc_main(pool_dir: str, older_than: float, dry_run: bool) -> int:
    """Reclaim trash older than `older_than`, never an item a row or its own record claims."""
    pool_dir = os.path.realpath(pool_dir)
    try:
        uuid = _pool_uuid(pool_dir)
        state = store_state(pool_dir, uuid)
        if state != "ok":
            raise CannotCheck(f"gc needs a readable meta.db to know what is claimed: {state}")
        store = Store(os.path.join(pool_dir, identity.META_DB), readonly=True)
        try:
            claimed = {v.id for v in store.list_volumes()} | {s.id for s in store.list_snapshots()}
        finally:
            store.close()
        backend = ImagePool(pool_dir, inspect_only=True)
    except (CannotCheck, StowageError) as exc:
        print(f"stowagectl: {exc}", file=sys.stderr)
        return 2
    kept = set(backend.claimed_in_trash(claimed))
    for name in sorted(kept):
        print(f"keeping {name}: a row or its own record claims it (move it back or remove by hand)")
    due = [t for t in backend.trash() if t.age_seconds >= older_than and t.name not in kept]
    for item in due:
        verb = "would remove" if dry_run else "removing"
        print(f"{verb} {item.name} ({item.allocated_bytes} bytes, {item.age_seconds:.0f} s old)")
    removed = 0 if dry_run else backend.empty_trash(older_than, claimed)
    left = len(backend.trash())
    print(f"reclaimed {removed} item(s); {left} left in trash")
    return 0


def rebuild_main(pool_dir: str, fmt: str = "table") -> int:
    """Exit status 0: rebuilt, every image accounted for; 1: rebuilt, some images need a
    person (listed); 2: not rebuilt."""
    try:
        report = rebuild_pool_dir(pool_dir)
    except StowageError as exc:
        print(f"stowagectl: cannot rebuild {pool_dir}: {exc}", file=sys.stderr)
        return 2
    if fmt == "table":
        for line in report.lines():
            print(line)
    else:
        print(
            output.emit(
                fmt,
                {
                    "volumes": report.volumes,
                    "snapshots": report.snapshots,
                    "unrecorded": report.unrecorded,
                    "unreadable": report.unreadable,
                    "foreign": report.foreign,
                    "duplicates": report.duplicates,
                    "moved_aside": report.moved_aside,
                    "seconds": round(report.seconds, 3),
                },
            )
        )
    return 1 if report.problems else 0
