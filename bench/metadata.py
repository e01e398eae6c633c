"""GetMetadataDelta (changed-block tracking) time against volume size: a 1 GiB and a 100 GiB
block volume, each with 1 % of it written before the base snapshot and another 1 % before the
target snapshot, in the same number of scattered ranges (64 each), so the two differ only in
size and bytes changed, not in extents. The delta and allocated streams are read to the end over
gRPC, as the external-snapshot-metadata sidecar would; the answer comes from extent maps, so the
ratio should stay near 1."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from typing import Any

from bench.env import published_block
from bench.stats import median
from csi_proto import csi_pb2, csi_pb2_grpc
from driver.backup import extents
from driver.ctl.client import Client, block_cap
from harness import Pool, Workspace

GiB = 1 << 30
RANGES = 64  # changed ranges per step, whatever the size: the same extent count
ALIGN = 64 << 10


def _scatter(device: str, size: int, rng: random.Random) -> int:
    """Write 1 % of the device in RANGES pieces at random aligned offsets; bytes written."""
    piece = max(ALIGN, (size // 100 // RANGES) // ALIGN * ALIGN)
    slots = size // piece
    fd = os.open(device, os.O_WRONLY)
    try:
        for slot in rng.sample(range(slots), RANGES):
            os.pwrite(fd, rng.randbytes(piece), slot * piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    return piece * RANGES


def _drain(stream: Iterable[Any]) -> tuple[int, int]:
    ranges = total = 0
    for msg in stream:
        ranges += len(msg.block_metadata)
        total += sum(b.size_bytes for b in msg.block_metadata)
    return ranges, total


def _measure(meta: csi_pb2_grpc.SnapshotMetadataStub, base: str, target: str) -> tuple[
    float, float, tuple[int, int]
]:
    """One GetMetadataDelta and one GetMetadataAllocated, each read to its end: seconds."""
    t0 = time.perf_counter()
    found = _drain(meta.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target)))
    t1 = time.perf_counter()
    _drain(meta.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(snapshot_id=target)))
    return t1 - t0, time.perf_counter() - t1, found


def run(
    env: Workspace, client: Client, pool: Pool, sizes: list[int], repeats: int, log: Any
) -> dict[str, Any]:
    """Both volumes are made first and measured in alternation, so that the load of a shared
    machine falls on both alike."""
    meta = csi_pb2_grpc.SnapshotMetadataStub(client.channel)
    rng = random.Random(3314)  # noqa: S311 - where to write, not a secret
    out: dict[str, Any] = {"sizes_GiB": [s // GiB for s in sizes], "ranges_per_step": RANGES}
    made: dict[int, tuple[str, str, str, int]] = {}
    for size in sizes:
        tag = f"{size // GiB}g"
        vid = client.create_volume(f"cbt-{tag}", size, block_cap()).volume_id
        with published_block(env, client, vid, "cbt", tag) as dev:
            _scatter(dev, size, rng)
            base = client.create_snapshot(f"cbt-base-{tag}", vid).snapshot_id
            written = _scatter(dev, size, rng)
            target = client.create_snapshot(f"cbt-target-{tag}", vid).snapshot_id
        made[size] = (vid, base, target, written)
    times: dict[int, tuple[list[float], list[float]]] = {s: ([], []) for s in sizes}
    found: dict[int, tuple[int, int]] = {}
    for i in range(repeats):
        for size in sizes if i % 2 == 0 else list(reversed(sizes)):
            _, base, target, _ = made[size]
            d, a, found[size] = _measure(meta, base, target)
            times[size][0].append(d)
            times[size][1].append(a)
    for size, (vid, base, target, written) in made.items():
        images = [os.path.join(pool.mount, "snapshots", s + ".img") for s in (base, target)]
        extent_counts = [len(extents.fiemap(i)) for i in images]
        delta_t, alloc_t = times[size]
        out[str(size // GiB)] = {
            "written_bytes": written,
            "extents": {"base": extent_counts[0], "target": extent_counts[1]},
            "delta_ranges": found[size][0],
            "delta_bytes": found[size][1],
            "delta_runs_s": delta_t,
            "delta_median_s": median(delta_t),
            "allocated_runs_s": alloc_t,
            "allocated_median_s": median(alloc_t),
        }
        log(f"  {size // GiB} GiB: delta {median(delta_t) * 1000:.1f} ms ({found[size][0]} "
            f"ranges, {found[size][1] >> 20} MiB for {written >> 20} MiB written), allocated "
            f"{median(alloc_t) * 1000:.1f} ms; extents base/target {extent_counts}")
        for sid in (base, target):
            client.delete_snapshot(sid)
        client.delete_volume(vid)
    return out
