"""Control path over the unix socket: Create/Delete latency at several concurrencies, sustained
Create+Delete pairs per second, and NodeStage+NodePublish latency, for Stowage and a peer
driver fed the same workload in alternated rounds."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.stats import median, percentile
from driver.ctl.client import Client, block_cap, mount_cap
from harness import Workspace

GiB = 1 << 30


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def create_delete(client: Client, prefix: str, n: int, conc: int) -> dict[str, list[float]]:
    """n CreateVolume calls with `conc` in flight, then n DeleteVolume calls likewise."""
    cap = mount_cap()
    ids: list[str] = [""] * n

    def create(i: int) -> float:
        t0 = time.perf_counter()
        ids[i] = client.create_volume(f"{prefix}-{i}", GiB, cap).volume_id
        return time.perf_counter() - t0

    def delete(i: int) -> float:
        return _timed(lambda: client.delete_volume(ids[i]))

    with ThreadPoolExecutor(max_workers=conc) as pool:
        created = list(pool.map(create, range(n)))
        deleted = list(pool.map(delete, range(n)))
    return {"create": created, "delete": deleted}


def sustained(client: Client, prefix: str, seconds: float, conc: int) -> float:
    """Create+Delete pairs per second with `conc` workers looping until the deadline."""
    cap = mount_cap()
    count = [0] * conc
    end = time.monotonic() + seconds
    t0 = time.perf_counter()

    def worker(w: int) -> None:
        i = 0
        while time.monotonic() < end:
            vid = client.create_volume(f"{prefix}-{w}-{i}", GiB, cap).volume_id
            client.delete_volume(vid)
            count[w] += 1
            i += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


def summarize(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000}


def run(clients: dict[str, Client], levels: list[int], n: int, rounds: int, seconds: float,
        sustain_conc: int, log: Any) -> dict[str, Any]:
    names = list(clients)
    per: dict[str, dict[int, dict[str, list[dict[str, float]]]]] = {
        who: {c: {"create": [], "delete": []} for c in levels} for who in names
    }
    raw: dict[str, dict[int, dict[str, list[float]]]] = {
        who: {c: {"create": [], "delete": []} for c in levels} for who in names
    }
    rates: dict[str, list[float]] = {who: [] for who in names}
    for rnd in range(rounds):
        order = names if rnd % 2 == 0 else list(reversed(names))
        for c in levels:
            for who in order:
                got = create_delete(clients[who], f"cp-{rnd}-{c}", max(n, 2 * c), c)
                for op in ("create", "delete"):
                    per[who][c][op].append(summarize(got[op]))
                    raw[who][c][op].extend(got[op])
        for who in order:
            rates[who].append(sustained(clients[who], f"sus-{rnd}", seconds, sustain_conc))
    out: dict[str, Any] = {"levels": levels, "n_per_round": n, "rounds": rounds}
    for who in names:
        lat: dict[str, Any] = {}
        for c in levels:
            lat[str(c)] = {
                op: {
                    "p50_ms": median([r["p50_ms"] for r in per[who][c][op]]),
                    "p99_ms": median([r["p99_ms"] for r in per[who][c][op]]),
                    "rounds": per[who][c][op],
                }
                for op in ("create", "delete")
            }
        out[who] = {
            "latency": lat,
            "pairs_per_s": median(rates[who]),
            "pairs_per_s_runs": rates[who],
            "sustain_concurrency": sustain_conc,
            "samples_ms": {
                str(c): {op: [x * 1000 for x in raw[who][c][op]] for op in ("create", "delete")}
                for c in levels
            },
        }
        log(f"  {who}: " + "; ".join(
            f"c{c} create p50/p99 {lat[str(c)]['create']['p50_ms']:.1f}/"
            f"{lat[str(c)]['create']['p99_ms']:.1f} ms delete "
            f"{lat[str(c)]['delete']['p50_ms']:.1f}/{lat[str(c)]['delete']['p99_ms']:.1f} ms"
            for c in levels) + f"; {median(rates[who]):.0f} pairs/s")
    return out


def stage_publish(env: Workspace, client: Client, per_kind: int, log: Any) -> dict[str, Any]:
    """NodeStage+NodePublish latency (first stage of a new volume, so mkfs included) and the
    matching NodeUnpublish+NodeUnstage, for ext4, xfs and block."""
    out: dict[str, Any] = {}
    os.makedirs(env.path("sp", "stage"))
    os.makedirs(env.path("sp", "pub"))
    kinds = {"ext4": mount_cap("ext4"), "xfs": mount_cap("xfs"), "block": block_cap()}
    for kind, cap in kinds.items():
        up: list[float] = []
        down: list[float] = []
        for i in range(per_kind):
            vid = client.create_volume(f"sp-{kind}-{i}", GiB, cap).volume_id
            stage = env.path("sp", "stage", f"{kind}-{i}")
            pub = env.path("sp", "pub", f"{kind}-{i}")
            t0 = time.perf_counter()
            client.stage(vid, stage, cap)
            client.publish(vid, stage, pub, cap)
            up.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.unpublish(vid, pub)
            client.unstage(vid, stage)
            down.append(time.perf_counter() - t0)
            client.delete_volume(vid)
        out[kind] = {"stage_publish": summarize(up), "unpublish_unstage": summarize(down),
                     "stage_publish_runs_ms": [x * 1000 for x in up]}
        log(f"  {kind}: stage+publish p50 {out[kind]['stage_publish']['p50_ms']:.0f} ms, "
            f"p99 {out[kind]['stage_publish']['p99_ms']:.0f} ms; unpublish+unstage p50 "
            f"{out[kind]['unpublish_unstage']['p50_ms']:.0f} ms")
    return out
