"""Data path: fio on a file of the pool filesystem (a) against published ext4 (b) and xfs (c)
volumes and a raw block volume (d), rounds alternated, medians reported."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from bench.stats import median, ratio
from driver.ctl.client import Client, block_cap, mount_cap
from harness import Pool, Workspace


@dataclass(frozen=True)
class Profile:
    name: str
    rw: str
    bs: str
    iodepth: int
    metric: str  # "iops" or "MB/s"


PROFILES = (
    Profile("4k randread qd32", "randread", "4k", 32, "iops"),
    Profile("4k randwrite qd32", "randwrite", "4k", 32, "iops"),
    Profile("1M seqread qd8", "read", "1M", 8, "MB/s"),
    Profile("1M seqwrite qd8", "write", "1M", 8, "MB/s"),
)
TARGETS = ("a", "b", "c", "d")
LABELS = {"a": "pool file", "b": "ext4 volume", "c": "xfs volume", "d": "block volume"}


@dataclass(frozen=True)
class Settings:
    file_size: int
    runtime: float
    ramp: float
    rounds: int
    preallocate: bool


def fio(filename: str, size: int, args: list[str], timeout: float) -> dict[str, Any]:
    argv = [
        "fio", "--name=bench", f"--filename={filename}", f"--size={size}", "--direct=1",
        "--ioengine=libaio", "--numjobs=1", "--output-format=json", *args,
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    job: dict[str, Any] = json.loads(res.stdout)["jobs"][0]
    return job


def layout(filename: str, size: int) -> float:
    """Write every block once so neither side reads unwritten extents or pays first-write
    extent conversion during the measurement. Returns MB/s of the layout pass."""
    job = fio(filename, size, ["--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1"], 900)
    return float(job["write"]["bw"]) / 1000.0


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def measure(filename: str, size: int, p: Profile, s: Settings) -> tuple[float, float]:
    """(figure, busy CPU microseconds per I/O across the machine during the run)."""
    args = [
        f"--rw={p.rw}", f"--bs={p.bs}", f"--iodepth={p.iodepth}", "--time_based",
        f"--runtime={s.runtime}s", f"--ramp_time={s.ramp}s", "--randrepeat=0",
    ]
    b0, _ = _busy_ticks()
    job = fio(filename, size, args, timeout=s.runtime + s.ramp + 120)
    b1, _ = _busy_ticks()
    side = job["read"] if p.rw in ("randread", "read") else job["write"]
    ios = float(side["total_ios"]) or 1.0
    # Ticks cover the ramp too; fio's total_ios does not, so scale by the share of time measured.
    cpu_us = (b1 - b0) / os.sysconf("SC_CLK_TCK") * 1e6 * s.runtime / (s.runtime + s.ramp) / ios
    value = float(side["iops"]) if p.metric == "iops" else float(side["bw"]) / 1000.0
    return value, cpu_us


def loop_settings(device: str) -> dict[str, str]:
    name = os.path.basename(device)
    out = {}
    for key in ("loop/dio", "queue/logical_block_size", "queue/scheduler", "queue/nr_requests",
                "queue/read_ahead_kb", "queue/max_sectors_kb", "queue/rotational"):
        try:
            with open(f"/sys/block/{name}/{key}", encoding="ascii") as fh:
                out[key] = fh.read().strip()
        except OSError:
            out[key] = ""
    return out


def run(env: Workspace, client: Client, pool: Pool, s: Settings, log: Any) -> dict[str, Any]:
    vol_size = s.file_size + (320 << 20)
    files: dict[str, str] = {}
    devices: dict[str, dict[str, str]] = {"pool": loop_settings(pool.device)}
    native = os.path.join(pool.mount, "bench-native")
    os.makedirs(native)
    files["a"] = os.path.join(native, "fio.dat")
    os.makedirs(env.path("dp", "stage"))
    os.makedirs(env.path("dp", "pub"))
    params = {"preallocate": "true" if s.preallocate else "false"}
    for key, fs in (("b", "ext4"), ("c", "xfs"), ("d", "")):
        cap = block_cap() if not fs else mount_cap(fs)
        vparams = {**params, **({"csi.storage.k8s.io/fstype": fs} if fs else {})}
        vol = client.create_volume(f"dp-{key}", vol_size, cap, parameters=vparams)
        stage, pub = env.path("dp", "stage", key), env.path("dp", "pub", key)
        client.stage(vol.volume_id, stage, cap)
        client.publish(vol.volume_id, stage, pub, cap)
        files[key] = pub if not fs else os.path.join(pub, "fio.dat")
        loops = env.loops.find(os.path.join(pool.mount, "volumes", vol.volume_id + ".img"))
        devices[key] = loop_settings(loops[0].device) if loops else {}
    layout_mbs = {}
    for key in TARGETS:
        layout_mbs[key] = layout(files[key], s.file_size)
        log(f"  laid out {LABELS[key]}: {s.file_size >> 20} MiB at {layout_mbs[key]:.0f} MB/s")

    results: dict[str, Any] = {}
    for p in PROFILES:
        runs: dict[str, list[float]] = {k: [] for k in TARGETS}
        cpu: dict[str, list[float]] = {k: [] for k in TARGETS}
        for rnd in range(s.rounds):
            order = TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS))  # A B C D, D C B A, …
            for key in order:
                value, cpu_us = measure(files[key], s.file_size, p, s)
                runs[key].append(value)
                cpu[key].append(cpu_us)
        med = {k: median(v) for k, v in runs.items()}
        paired = {
            k: median([ratio(x, a) for x, a in zip(runs[k], runs["a"], strict=True)])
            for k in ("b", "c", "d")
        }
        results[p.name] = {
            "metric": p.metric,
            "runs": runs,
            "median": med,
            "ratio": {k: ratio(med[k], med["a"]) for k in ("b", "c", "d")},
            "paired_ratio": paired,
            "cpu_us_per_io": {k: median(v) for k, v in cpu.items()},
        }
        log(
            f"  {p.name}: "
            + ", ".join(f"{LABELS[k]} {med[k]:.0f}" for k in TARGETS)
            + f" {p.metric}; ratios "
            + " ".join(f"{k}/a={results[p.name]['ratio'][k]:.2f}" for k in ("b", "c", "d"))
            + "; busy CPU µs/IO "
            + " ".join(f"{k}={results[p.name]['cpu_us_per_io'][k]:.1f}" for k in TARGETS)
        )
    return {
        "settings": {
            "file_size": s.file_size, "runtime_s": s.runtime, "ramp_s": s.ramp,
            "rounds": s.rounds, "preallocate": s.preallocate,
        },
        "devices": devices,
        "layout_MBps": layout_mbs,
        "profiles": results,
    }
