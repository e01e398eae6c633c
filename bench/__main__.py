"""`python -m bench [--quick]`: run every section, print the table, write the JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench import control, datapath, iolimits, metadata, peer, rebuild, scale, snapshots
from bench.env import bench_driver, disk_pool
from bench.report import Row, plot, print_table, rows_for
from harness import REPO, Workspace

GiB = 1 << 30


@dataclass(frozen=True)
class Mode:
    name: str
    dp: datapath.Settings
    snap_repeats: int
    ext4_repeats: int
    cp_levels: list[int]
    cp_n: int
    cp_rounds: int
    cp_seconds: float
    sp_per_kind: int
    scale_volumes: int
    scale_staged: int
    scale_repeats: int


def modes(preallocate: bool) -> dict[str, Mode]:
    return {
        "full": Mode(
            "full", datapath.Settings(1 * GiB, 20.0, 2.0, 3, preallocate), 5, 5, [1, 16, 64],
            256, 3, 10.0, 10, 1000, 500, 3,
        ),
        "quick": Mode(
            "quick", datapath.Settings(256 << 20, 1.5, 0.5, 3, preallocate), 5, 3, [1, 16, 64],
            64, 3, 2.0, 3, 200, 100, 3,
        ),
    }


def _clean(o: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def log(msg: str) -> None:
    print(msg, flush=True)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="short runs, smaller scale (< 3 min)")
    ap.add_argument("--only", default="datapath,snapshots,metadata,iolimits,control,scale,rebuild",
                    help="comma-separated sections")
    ap.add_argument("--preallocate", action="store_true",
                    help="data-path volumes with preallocate=true (default: sparse, as the "
                    "driver's default StorageClass makes them)")
    ap.add_argument("--driver-arg", action="append", default=[],
                    help="extra flag for the driver (repeatable), e.g. --loop-sector-size=512")
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("make bench needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    mode = modes(preallocate=args.preallocate)["quick" if args.quick else "full"]
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    result: dict[str, Any] = {
        "timestamp": stamp,
        "mode": mode.name,
        "sections": sections,
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "fio": subprocess.run(["fio", "--version"], capture_output=True, text=True,
                                  check=False).stdout.strip(),
        },
        "git": subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=False).stdout.strip(),
        "driver_args": args.driver_arg,
    }
    env = Workspace("stowage-bench-")
    log(f"bench ({mode.name}) in {env.base}")
    failed: BaseException | None = None
    try:
        pool = disk_pool(env, "pool", "xfs")
        result["pool"] = {"fs": "xfs reflink=1", "loop_direct_io": pool.direct_io,
                          "loop_sector_size": 4096, "backing": "sparse file on " + env.base}
        drv = bench_driver(pool, "driver", *args.driver_arg)
        client = drv.start()
        if sections == ["rebuild"]:  # the rebuild makes its own pool
            client.close()
            drv.stop()
        if "datapath" in sections:
            log("data path (fio)")
            result["datapath"] = datapath.run(env, client, pool, mode.dp, log)
        if "snapshots" in sections:
            log("snapshots and clones")
            result["snapshots"] = {
                "xfs": snapshots.run(env, client, [1 * GiB, 10 * GiB, 100 * GiB],
                                     mode.snap_repeats, "xfs", log),
            }
            ext4 = disk_pool(env, "pool-ext4", "ext4")
            d4 = bench_driver(ext4, "driver-ext4", *args.driver_arg)
            c4 = d4.start()
            result["snapshots"]["ext4"] = snapshots.run(
                env, c4, [1 * GiB, 100 * GiB], mode.ext4_repeats, "ext4", log)
            c4.close()
            d4.stop()
        if "metadata" in sections:
            log("snapshot metadata (GetMetadataDelta)")
            result["metadata"] = metadata.run(env, client, pool, [1 * GiB, 100 * GiB], 25, log)
        if "iolimits" in sections:
            log(f"I/O limits (fio in a pod cgroup, {iolimits.LIMIT} IOPS limit)")
            result["iolimits"] = iolimits.run(
                env, client, min(mode.dp.runtime, 10.0), mode.dp.rounds, log)
        if "control" in sections:
            log("control path")
            p = peer.build()
            log(f"  peer {p.kind} ({p.binary}), build/lookup {p.build_s:.1f} s")
            pc, ppid = peer.start(env, p)
            result["control"] = control.run(
                {"stowage": client, "peer": pc}, mode.cp_levels, mode.cp_n, mode.cp_rounds,
                mode.cp_seconds, 16, log)
            result["control"]["peer_info"] = {
                "kind": p.kind, "binary": p.binary, "build_s": p.build_s, "pid": ppid,
                "build_log": p.build_log,
            }
            pc.close()
            log("stage + publish")
            result["stage_publish"] = control.stage_publish(env, client, mode.sp_per_kind, log)
        client.close()
        drv.stop()
        if "scale" in sections:
            log(f"scale ({mode.scale_volumes} volumes, {mode.scale_staged} staged)")
            spool = disk_pool(env, "pool-scale", "xfs")
            sd = bench_driver(spool, "driver-scale", *args.driver_arg)
            sc = sd.start()
            result["scale"], sc = scale.run(env, sd, sc, mode.scale_volumes, mode.scale_staged,
                                            mode.scale_repeats, log)
            sc.close()
            sd.stop()
        if "rebuild" in sections:
            log(f"store rebuild ({mode.scale_volumes} volumes)")
            result["rebuild"] = rebuild.run(env, mode.scale_volumes, log)
    except BaseException as exc:  # noqa: BLE001 - recorded, cleaned up, then re-raised
        failed = exc
        log(f"bench interrupted: {exc!r}")
    finally:
        log("cleaning up")
        try:
            result["cleanup"] = env.cleanup()
        except RuntimeError as exc:
            result["cleanup"] = [str(exc)]
        for note in result["cleanup"]:
            log("  " + note)
    result["wall_s"] = time.monotonic() - started
    rows: list[Row] = rows_for(result)
    result["table"] = [r.as_dict() for r in rows]
    result["failed"] = repr(failed) if failed else None
    os.makedirs(args.results, exist_ok=True)
    out = os.path.join(args.results, f"{stamp}-{mode.name}.json")
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(_clean(result), fh, indent=1, default=str)
    print_table(rows)
    png = plot(result, out.removesuffix(".json") + ".png")
    log(f"wall time {result['wall_s']:.0f} s; results {out}" + (f"; plot {png}" if png else ""))
    if failed is not None:
        if isinstance(failed, KeyboardInterrupt):
            return 130
        raise failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
