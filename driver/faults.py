"""Named fault points: where the crash suite ends the process as `kill -9` would.

A fault point is a call `faults.hit("op:step")` placed between two steps of a mutating
operation. It does nothing unless the variable STOWAGE_FAULTS named it when the process started
(`configure()` is called once by the CLI), so production behaviour is unchanged.

    STOWAGE_FAULTS="create-volume:recorded"            kill -9 the first time the point is reached
    STOWAGE_FAULTS="stage:mounted@2"                   ... the second time
    STOWAGE_FAULTS="create-volume:checked=sleep:0.5" pause there instead (to force overlaps)
    STOWAGE_FAULTS="probe:answering@5=hang"           from the fifth hit on, every hit blocks
                                                       for good (a hung driver, for probes)

Several entries are separated by commas. Unknown names are refused at start-up, so a typo in a
test cannot silently test nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

ENV = "STOWAGE_FAULTS"

# Operation → its fault points in the order the operation reaches them. The crash suite walks
# this table, so a point added to the code but not here fails `hit()` (unknown name).
OPERATIONS: dict[str, tuple[str, ...]] = {
    "create-volume": (
        "create-volume:checked",
        "image:written",
        "create-volume:image-ready",
        "create-volume:recorded",
    ),
    "restore-volume": (
        "restore-volume:checked",
        "image:tmp-written",
        "restore-volume:image-ready",
        "restore-volume:recorded",
    ),
    "clone-volume": (
        "clone-volume:checked",
        "clone-volume:frozen",
        "image:tmp-written",
        "clone-volume:image-ready",
        "clone-volume:recorded",
    ),
    "delete-volume": (
        "delete-volume:checked",
        "delete-volume:unrecorded",
        "image:unlinked",
        "delete-volume:image-gone",
    ),
    "create-snapshot": (
        "create-snapshot:checked",
        "create-snapshot:frozen",
        "image:tmp-written",
        "create-snapshot:image-ready",
        "create-snapshot:recorded",
    ),
    "delete-snapshot": (
        "delete-snapshot:checked",
        "delete-snapshot:unrecorded",
        "image:unlinked",
        "delete-snapshot:image-gone",
    ),
    "create-group": (
        "create-group:checked",
        "create-group:journaled",
        "create-group:frozen",
        "image:tmp-written",
        "create-group:images-ready",
        "create-group:recorded",
    ),
    "delete-group": (
        "delete-group:checked",
        "delete-group:unrecorded",
        "image:unlinked",
        "delete-group:images-gone",
    ),
    "node-expand": (
        "node-expand:journaled",
        "node-expand:image-grown",
        "node-expand:loop-refreshed",
        "node-expand:fs-grown",
        "node-expand:recorded",
    ),
    "stage": (
        "stage:loop-attached",
        "stage:formatted",
        "stage:mounted",
    ),
    "publish": (
        "publish:bound",
        "publish:recorded",
    ),
    "unpublish": (
        "unpublish:unmounted",
        "unpublish:target-removed",
    ),
    "unstage": (
        "unstage:unmounted",
        "unstage:detached",
    ),
}

# The backup jobs' fault points (docs/backup.md): uploads and restores run in the driver's
# background jobs, the garbage collector in `stowagectl backup gc`. tests/backup/test_kill.py
# walks this table the way the crash suite walks OPERATIONS.
BACKUP_OPERATIONS: dict[str, tuple[str, ...]] = {
    "backup-upload": (
        "backup-upload:chunk-stored",  # a chunk is in the store, the manifest is not
        "backup-upload:manifest-written",  # durable in the target, not yet recorded as done
    ),
    "backup-restore": (
        "backup-restore:chunk-written",  # some chunks are in the partial image
        "backup-restore:image-ready",  # whole image verified, the volume not yet recorded
    ),
    "backup-gc": (
        "backup-gc:marked",  # candidate list written
        "backup-gc:chunk-deleted",  # a sweep midway: some candidates deleted, the list stays
    ),
}

# Points outside any mutating operation (the crash suite does not walk them): where a hung
# driver is simulated, e.g. the CSI Probe that the chart's liveness probe goes through.
HANG_POINTS: tuple[str, ...] = ("probe:answering",)

POINTS: frozenset[str] = frozenset(
    [
        *(p for table in (OPERATIONS, BACKUP_OPERATIONS) for pts in table.values() for p in pts),
        *HANG_POINTS,
    ]
)


@dataclass
class _Armed:
    nth: int
    sleep: float | None  # None: crash
    seen: int = 0
    hang: bool = False  # block every hit from the nth on, for good


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, _Armed]:
    """`name[@N][=crash|=sleep:SECONDS|=hang]`, comma-separated; ValueError on anything else."""
    out: dict[str, _Armed] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        target, _, action = entry.partition("=")
        name, _, nth_text = target.partition("@")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r}")
        nth = int(nth_text) if nth_text else 1
        if nth < 1:
            raise ValueError(f"{ENV}: {entry!r}: the hit number starts at 1")
        sleep: float | None = None
        if action == "hang":
            out[name] = _Armed(nth, None, hang=True)
            continue
        if action and action != "crash":
            kind, _, seconds = action.partition(":")
            if kind != "sleep" or not seconds:
                raise ValueError(f"{ENV}: {entry!r}: action must be crash, sleep:SECONDS or hang")
            sleep = float(seconds)
        out[name] = _Armed(nth, sleep)
    return out


def configure(spec: str | None = None) -> list[str]:
    """Arm the points named by `spec` (default: the environment). Returns the armed names."""
    armed = parse(os.environ.get(ENV, "") if spec is None else spec)
    with _lock:
        _armed.clear()
        _armed.update(armed)
    return sorted(armed)


def _hang_forever() -> None:
    threading.Event().wait()  # never set: this thread is stuck until the process ends


def hit(name: str) -> None:
    if name not in POINTS:
        raise KeyError(f"fault point {name!r} is in neither OPERATIONS nor HANG_POINTS")
    if not _armed:
        return
    with _lock:
        armed = _armed.get(name)
        if armed is None:
            return
        armed.seen += 1
        if armed.hang and armed.seen >= armed.nth:
            pass
        elif armed.seen != armed.nth:
            return
    if armed.hang:
        _hang_forever()
        return
    if armed.sleep is not None:
        time.sleep(armed.sleep)
        return
    # Like kill -9: no finally blocks, no atexit, no flushing of anything but this line.
    sys.stderr.flush()
    os.write(2, f"stowage: fault point {name} reached; killing the process\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
