"""Snapshot and clone time against volume size: the same 256 MiB written into sparse volumes
of different sizes, CreateSnapshot and CreateVolume(from volume) timed end to end over gRPC."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench.env import published_block
from bench.stats import median
from driver.ctl.client import Client, block_cap
from harness import Workspace

GiB = 1 << 30
WRITTEN = 256 << 20


def _write(env: Workspace, client: Client, volume_id: str, tag: str) -> None:
    """Stage and publish as a block device, write 256 MiB of random data, take it down."""
    with published_block(env, client, volume_id, "snap", tag) as pub:
        subprocess.run(
            ["fio", "--name=fill", f"--filename={pub}", f"--size={WRITTEN}", "--rw=write",
             "--bs=1M", "--iodepth=8", "--direct=1", "--ioengine=libaio",
             "--refill_buffers", "--end_fsync=1", "--output=/dev/null"],
            check=True, timeout=600,
        )


def run(env: Workspace, client: Client, sizes: list[int], repeats: int, tag: str,
        log: Any) -> dict[str, Any]:
    vols = {}
    for size in sizes:
        vol = client.create_volume(f"snap-{tag}-{size // GiB}g", size, block_cap())
        _write(env, client, vol.volume_id, f"{tag}-{size // GiB}")
        vols[size] = vol.volume_id
    snap_t: dict[int, list[float]] = {s: [] for s in sizes}
    clone_t: dict[int, list[float]] = {s: [] for s in sizes}
    for i in range(repeats):
        order = sizes if i % 2 == 0 else list(reversed(sizes))  # alternate small and large
        for size in order:
            t0 = time.perf_counter()
            snap = client.create_snapshot(f"s-{tag}-{size // GiB}g-{i}", vols[size])
            snap_t[size].append(time.perf_counter() - t0)
            client.delete_snapshot(snap.snapshot_id)
        for size in order:
            t0 = time.perf_counter()
            clone = client.create_volume(
                f"c-{tag}-{size // GiB}g-{i}", size, block_cap(), volume=vols[size]
            )
            clone_t[size].append(time.perf_counter() - t0)
            client.delete_volume(clone.volume_id)
    for vid in vols.values():
        client.delete_volume(vid)
    out: dict[str, Any] = {"sizes_GiB": [s // GiB for s in sizes], "written_bytes": WRITTEN}
    for label, data in (("snapshot", snap_t), ("clone", clone_t)):
        out[label] = {str(s // GiB): {"runs_s": v, "median_s": median(v)} for s, v in data.items()}
        log(f"  {tag} {label}: " + ", ".join(
            f"{s // GiB} GiB {median(v) * 1000:.1f} ms" for s, v in data.items()))
    return out
