"""I/O limits (issue 18): IOPS that fio measures (direct I/O, from a pod-like cgroup made for the
purpose, see tests/podcgroup.py) through a published block volume's loop device, unlimited and
under a 1,000 IOPS read and write limit set by ControllerModifyVolume. Rounds alternate the two
settings; medians reported."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench.stats import median
from driver import CONTEXT_POD_UID, MUTABLE_READ_IOPS, MUTABLE_WRITE_IOPS
from driver.ctl.client import Client, block_cap
from harness import Workspace
from tests.podcgroup import PodCgroup

LIMIT = 1000
# name -> fio arguments (direct I/O is always on)
PROFILES = {
    "4k randread qd1": ["--rw=randread", "--bs=4k", "--ioengine=psync"],
    "4k randread qd32": ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=32"],
    "4k randwrite qd32": ["--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=32"],
}
SETTINGS = {
    "unlimited": {MUTABLE_READ_IOPS: "unlimited", MUTABLE_WRITE_IOPS: "unlimited"},
    "limited": {MUTABLE_READ_IOPS: str(LIMIT), MUTABLE_WRITE_IOPS: str(LIMIT)},
}


def run(
    env: Workspace, client: Client, runtime: float, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    vol = client.create_volume("bench-iolimits", 1 << 30, block_cap())
    vid = vol.volume_id
    staging, target = env.path("iolimits-staging"), env.path("iolimits-target")
    os.makedirs(staging)
    pod = PodCgroup()
    app = pod.container("app")
    samples: dict[str, dict[str, list[float]]] = {
        s: {p: [] for p in PROFILES} for s in SETTINGS
    }
    published = False
    try:
        client.stage(vid, staging, block_cap())
        client.publish(vid, staging, target, block_cap(), context={CONTEXT_POD_UID: pod.uid})
        published = True
        for r in range(rounds):
            for setting, mutable in SETTINGS.items():
                client.modify_volume(vid, mutable)
                for name, args in PROFILES.items():
                    job = pod.fio(
                        app, target,
                        [*args, "--time_based", f"--runtime={runtime}s", "--randrepeat=0"],
                        timeout=runtime + 120,
                    )
                    side = "write" if "write" in name else "read"
                    samples[setting][name].append(float(job[side]["iops"]))
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {samples['limited'][n][-1]:.0f} / {samples['unlimited'][n][-1]:.0f}"
                for n in PROFILES) + " IOPS (limited / unlimited)")
    finally:
        if published:
            client.unpublish(vid, target)
        client.unstage(vid, staging)
        client.delete_volume(vid)
        pod.remove()
    return {
        "limit_iops": LIMIT,
        "cgroup": f"v{pod.hierarchy.version} {pod.hierarchy.root}",
        "runtime_s": runtime,
        "rounds": rounds,
        "profiles": {
            name: {s: median(samples[s][name]) for s in SETTINGS} | {
                "samples": {s: samples[s][name] for s in SETTINGS}
            }
            for name in PROFILES
        },
    }
