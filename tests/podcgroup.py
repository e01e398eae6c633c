"""A stand-in for a pod's cgroup on this host, for the I/O-limit tests and `make bench`: a cgroup
named `pod<uid>` (as kubelet's cgroupfs driver names them) under a parent this module creates in
the block I/O hierarchy, with container cgroups below it, and fio run inside one of them.

Only cgroups this module made are removed (after their processes exited); nothing else in the
hierarchy is touched."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from typing import Any

from driver.host import cgroups, mountinfo


class PodCgroup:
    def __init__(self) -> None:
        hierarchy = cgroups.io_hierarchy(mountinfo.read())
        if hierarchy is None:
            raise RuntimeError("this host has no block I/O cgroup controller (v1 blkio, v2 io)")
        self.hierarchy = hierarchy
        self.uid = str(uuid.uuid4())
        self.parent = os.path.join(hierarchy.root, f"stowage-test-{self.uid[:8]}")
        self.pod = os.path.join(self.parent, f"pod{self.uid}")
        self._made: list[str] = []
        self._mkdir(self.parent)
        if hierarchy.version == 2:
            self._enable_io(hierarchy.root)
            self._enable_io(self.parent)
        self._mkdir(self.pod)
        if hierarchy.version == 2:
            self._enable_io(self.pod)

    def _mkdir(self, path: str) -> None:
        os.mkdir(path)
        self._made.append(path)

    @staticmethod
    def _enable_io(path: str) -> None:
        with open(os.path.join(path, "cgroup.subtree_control"), "w", encoding="ascii") as fh:
            fh.write("+io")

    def container(self, name: str) -> str:
        """A container's cgroup below the pod's (made now: as a container started later)."""
        path = os.path.join(self.pod, name)
        self._mkdir(path)
        return path

    def limit_file(self, cgroup: str) -> str:
        name = "blkio.throttle.read_iops_device" if self.hierarchy.version == 1 else "io.max"
        with open(os.path.join(cgroup, name), encoding="ascii") as fh:
            return fh.read()

    def fio(self, cgroup: str, filename: str, args: list[str], timeout: float) -> dict[str, Any]:
        """fio with direct I/O in `cgroup`: the process joins it before exec, so every I/O it
        issues is charged there. Returns fio's JSON job."""
        argv = [
            "fio", "--name=limit", f"--filename={filename}", "--direct=1", "--numjobs=1",
            "--output-format=json", *args,
        ]
        procs = os.path.join(cgroup, "cgroup.procs")
        res = subprocess.run(
            ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"fio failed ({res.returncode}): {res.stderr.strip()[-500:]}")
        job: dict[str, Any] = json.loads(res.stdout)["jobs"][0]
        return job

    def remove(self) -> None:
        """Remove the cgroups this made, deepest first (their processes have exited)."""
        for path in reversed(self._made):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)
        self._made.clear()


def read_iops(cg: PodCgroup, cgroup: str, filename: str, seconds: float) -> float:
    """Measured 4 KiB random-read IOPS (direct I/O, queue depth 1) from `cgroup`."""
    job = cg.fio(
        cgroup,
        filename,
        ["--rw=randread", "--bs=4k", "--ioengine=psync", "--time_based",
         f"--runtime={seconds}s", "--randrepeat=0"],
        timeout=seconds + 60,
    )
    return float(job["read"]["iops"])
