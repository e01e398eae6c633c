"""Rebuilding the metadata store from the images alone (issue 15): N volumes created through
the driver, the driver stopped, meta.db deleted, then `stowagectl pool rebuild` timed (the
process as an operator runs it, and the rebuild inside it). Target: 1,000 volumes in <= 10 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.env import bench_driver, disk_pool
from driver.ctl.client import mount_cap
from harness import REPO, Workspace

MiB = 1 << 20


def run(env: Workspace, volumes: int, log: Any) -> dict[str, Any]:
    pool = disk_pool(env, "pool-rebuild", "xfs")
    drv = bench_driver(pool, "driver-rebuild")
    client = drv.start()
    cap = mount_cap("ext4")
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: client.create_volume(f"rb-{i}", 64 * MiB, cap), range(volumes)))
    client.close()
    drv.stop()
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(pool.mount, "meta.db" + suffix)
        if os.path.exists(path):
            os.unlink(path)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "driver.ctl.main", "-o", "json", "pool", "rebuild",
         "--pool-dir", pool.mount],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pool rebuild failed ({proc.returncode}): {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    rebuilt = len(out["volumes"])
    if rebuilt != volumes:
        raise RuntimeError(f"rebuilt {rebuilt} of {volumes} volumes")
    log(f"  rebuilt {rebuilt} volumes: {out['seconds']:.2f} s inside, {wall:.2f} s wall")
    # the driver serves the rebuilt store
    client = drv.start()
    ready_s = drv.ready_seconds
    listed = len(client.list_volumes())
    client.close()
    drv.stop()
    return {
        "volumes": volumes,
        "rebuilt": rebuilt,
        "rebuild_s": out["seconds"],
        "wall_s": wall,
        "listed_after": listed,
        "restart_s": ready_s,
    }
