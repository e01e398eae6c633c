"""Scale: many volumes, half of them staged and published; driver RSS, ListVolumes over all
pages, and restart-to-ready (Probe answers ready only after start-up reconciliation)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.stats import median
from driver.ctl.client import Client, block_cap, mount_cap
from harness import DriverProcess, Workspace

MiB = 1 << 20


def run(env: Workspace, driver: DriverProcess, client: Client, volumes: int, staged: int,
        repeats: int, log: Any) -> tuple[dict[str, Any], Client]:
    """Half the volumes are small ext4 filesystems (64 MiB), half raw block; of the staged
    ones half are ext4 (staged: mkfs + mount; published: bind mount) and half block
    (published: the loop device node bound onto a file), like a node running mixed pods."""
    os.makedirs(env.path("sc", "stage"))
    os.makedirs(env.path("sc", "pub"))
    caps = {"ext4": mount_cap("ext4"), "block": block_cap()}

    def kind(i: int) -> str:
        return "ext4" if i % 2 == 0 else "block"

    ids: list[str] = [""] * volumes

    def create(i: int) -> None:
        ids[i] = client.create_volume(f"scale-{i}", 64 * MiB, caps[kind(i)]).volume_id

    def up(i: int) -> None:
        cap = caps[kind(i)]
        stage, pub = env.path("sc", "stage", str(i)), env.path("sc", "pub", str(i))
        client.stage(ids[i], stage, cap)
        client.publish(ids[i], stage, pub, cap)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, range(volumes)))
    created_s = time.perf_counter() - t0
    log(f"  created {volumes} volumes in {created_s:.1f} s")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(up, range(staged)))
    staged_s = time.perf_counter() - t0
    log(f"  staged and published {staged} in {staged_s:.1f} s")

    rss_before = driver.rss_bytes()
    listed: list[float] = []
    count = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = len(client.list_volumes())
        listed.append(time.perf_counter() - t0)
    restarts: list[float] = []
    for _ in range(repeats):
        client.close()
        driver.stop()
        client = driver.start()
        restarts.append(driver.ready_seconds)
    # Steady state after a restart, once a client has listed everything again.
    client.list_volumes()
    rss_after = driver.rss_bytes()
    out: dict[str, Any] = {
        "volumes": volumes,
        "staged_published": staged,
        "mix": "half ext4 64 MiB, half block 64 MiB; staged: half ext4, half block",
        "create_all_s": created_s,
        "stage_publish_all_s": staged_s,
        "rss_bytes_after_setup": rss_before,
        "rss_bytes_after_restart": rss_after,
        "rss_bytes": max(rss_before, rss_after),
        "list_volumes_s": median(listed),
        "list_volumes_runs_s": listed,
        "listed": count,
        "restart_s": median(restarts),
        "restart_runs_s": restarts,
    }
    log(f"  RSS {out['rss_bytes'] / 1e6:.0f} MB, ListVolumes ({count}) "
        f"{out['list_volumes_s'] * 1000:.0f} ms, restart {out['restart_s']:.2f} s")
    return out, client
