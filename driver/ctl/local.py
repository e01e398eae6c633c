"""stowagectl commands that work on a node's pool directly, without the driver's socket."""

from __future__ import annotations

import json
import os
import re

from driver.core.check import Findings, inspect
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from driver.storage.image import ImagePool
from driver.storage.store import Store

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d`, `2w` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def check(pool_dir: str) -> Findings:
    store = Store(os.path.join(pool_dir, "meta.db"), readonly=True)
    try:
        backend = ImagePool(pool_dir, inspect_only=True)
        return inspect(store, backend, LoopManager(SubprocessRunner()))
    finally:
        store.close()


def check_main(pool_dir: str, as_json: bool) -> int:
    found = check(pool_dir)
    if as_json:
        print(json.dumps({"ok": found.ok, "problems": found.problems, "notes": found.notes}))
    else:
        for line in found.problems:
            print(f"PROBLEM {line}")
        for line in found.notes:
            print(f"note    {line}")
        print("consistent" if found.ok else f"{len(found.problems)} problem(s)")
    return 0 if found.ok else 1


def gc_main(pool_dir: str, older_than: float, dry_run: bool) -> int:
    backend = ImagePool(pool_dir, inspect_only=True)
    due = [t for t in backend.trash() if t.age_seconds >= older_than]
    for item in due:
        verb = "would remove" if dry_run else "removing"
        print(f"{verb} {item.name} ({item.allocated_bytes} bytes, {item.age_seconds:.0f} s old)")
    removed = 0 if dry_run else backend.empty_trash(older_than)
    kept = len(backend.trash())
    print(f"reclaimed {removed} item(s); {kept} left in trash")
    return 0
