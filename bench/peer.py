"""The control-path peer: csi-driver-host-path (or the workalike when the module proxy does
not serve it), built by tests/tools/install-hostpath.sh and run as a child process."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from driver.ctl.client import Client
from harness import REPO, Workspace, wait_ready


@dataclass
class Peer:
    kind: str
    binary: str
    build_s: float
    build_log: str


def build() -> Peer:
    t0 = time.monotonic()
    res = subprocess.run(
        [os.path.join(REPO, "tests", "tools", "install-hostpath.sh")],
        capture_output=True, text=True, check=True, timeout=3600,
    )
    kind, binary = res.stdout.strip().splitlines()[-1].split(" ", 1)
    return Peer(kind, binary, time.monotonic() - t0, res.stderr.strip())


def start(env: Workspace, peer: Peer) -> tuple[Client, int]:
    endpoint = "unix://" + env.path("peer.sock")
    state = env.path("peer-state")
    proc = env.spawn(
        [peer.binary, f"--endpoint={endpoint}", "--nodeid=bench-node", f"--statedir={state}",
         "--drivername=hostpath.csi.k8s.io"],
        "peer.log",
    )
    return wait_ready(endpoint, proc, 60), proc.pid
