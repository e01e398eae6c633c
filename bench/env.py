"""The bench's private world: one temporary directory, pools made from files in it, driver and
peer processes started and stopped by PID, and a clean-up that leaves nothing behind.

Nothing outside the temporary directory is touched: only mounts under it are unmounted, only
loop devices whose backing file lies under it are detached, only processes this module started
are signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from csi_proto import csi_pb2
from driver.ctl.client import Client, block_cap, probe_ready
from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POOL_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-m0", "-E", "nodiscard"],
}


@dataclass(frozen=True)
class PoolDir:
    name: str
    image: str
    mount: str
    device: str
    fs_type: str
    direct_io: bool


class Env:
    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="stowage-bench-")
        self.runner = SubprocessRunner()
        self.loops = LoopManager(self.runner)
        self._procs: list[subprocess.Popen[bytes]] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    # --- pools ----------------------------------------------------------------------------------
    def make_pool(self, name: str, fs_type: str = "xfs", size: int = 256 << 30) -> PoolDir:
        """A pool filesystem on a sparse file on this machine's disk, attached like a disk:
        loop device with direct I/O (so neither side of a comparison runs from the host's page
        cache through the pool) and 4096-byte sectors, formatted on the device."""
        image, mount = self.path(name + ".img"), self.path(name)
        os.makedirs(mount)
        with open(image, "wb") as fh:
            fh.truncate(size)
        loop = self.loops.attach(image, sector_size=4096, direct_io=True)
        self.runner.run([*POOL_MKFS[fs_type], loop.device], timeout=300)
        self.runner.run(["mount", "-t", fs_type, "--", loop.device, mount])
        return PoolDir(name, image, mount, loop.device, fs_type, loop.direct_io)

    # --- processes ------------------------------------------------------------------------------
    def spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> (
        subprocess.Popen[bytes]
    ):
        with open(self.path(log_name), "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches us, and we stop the child by PID
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)
        return code

    # --- clean-up -------------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Stop our processes, unmount and detach everything under base, remove base."""
        notes: list[str] = []
        for proc in list(self._procs):
            notes.append(f"stopped pid {proc.pid} ({self.stop(proc, timeout=30)})")
        prefix = self.base + os.sep
        for _ in range(8):
            progress = False
            entries = mountinfo.mounts_under(self.base)
            for entry in sorted(entries, key=lambda e: -len(e.mount_point)):
                res = self.runner.run(["umount", "--", entry.mount_point], check=False)
                progress |= res.returncode == 0
            mounted = {e.source for e in mountinfo.read()}
            for lo in self.loops.devices():
                if lo.backing_file.startswith(prefix) and lo.device not in mounted:
                    res = self.runner.run(["losetup", "--detach", lo.device], check=False)
                    progress |= res.returncode == 0
            left_loops = [lo for lo in self.loops.devices() if lo.backing_file.startswith(prefix)]
            if not mountinfo.mounts_under(self.base) and not left_loops:
                break
            if not progress:
                time.sleep(0.5)
        left = [e.mount_point for e in mountinfo.mounts_under(self.base)]
        left_devices = [
            lo.device for lo in self.loops.devices() if lo.backing_file.startswith(prefix)
        ]
        if left or left_devices:
            notes.append(f"NOT removing {self.base}: mounts {left}, loops {left_devices}")
            return notes
        shutil.rmtree(self.base)
        notes.append(f"removed {self.base}")
        return notes


class Driver:
    """`python -m driver --mode all` on a pool, on a socket in the bench directory."""

    def __init__(self, env: Env, pool: PoolDir, name: str, *extra: str) -> None:
        self.env = env
        self.pool = pool
        self.name = name
        self.socket = env.path(name + ".sock")
        self.endpoint = "unix://" + self.socket
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float = 120.0) -> tuple[Client, float]:
        """Start the driver; return a client and the seconds until Probe said ready."""
        argv = [
            sys.executable, "-m", "driver", "--mode", "all", "--endpoint", self.endpoint,
            "--pool-dir", self.pool.mount, "--node-id", "bench-node", "--log-level", "warning",
            *self.extra,
        ]
        started = time.monotonic()
        self.proc = self.env.spawn(argv, self.name + ".log")
        try:
            ready = wait_probe(self.endpoint, self.proc, deadline)
        except RuntimeError as exc:
            with open(self.env.path(self.name + ".log"), encoding="utf-8", errors="replace") as fh:
                tail = "".join(fh.readlines()[-15:])
            raise RuntimeError(f"{exc}; last lines of {self.name}.log:\n{tail}") from None
        return Client(self.endpoint, timeout=300), ready - started

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = self.env.stop(self.proc)
        self.proc = None
        return code

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def wait_probe(endpoint: str, proc: subprocess.Popen[bytes], deadline: float) -> float:
    """Poll Probe every 10 ms until ready; return the monotonic time it first said ready."""
    from csi_proto import csi_pb2_grpc

    end = time.monotonic() + deadline
    sock = endpoint.removeprefix("unix://")
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before ready")
        if os.path.exists(sock):
            with grpc.insecure_channel(endpoint) as ch:
                stub = csi_pb2_grpc.IdentityStub(ch)
                while time.monotonic() < end:
                    try:
                        if probe_ready(stub.Probe(csi_pb2.ProbeRequest(), timeout=5)):
                            return time.monotonic()
                    except grpc.RpcError:
                        if proc.poll() is not None:
                            break
                    time.sleep(0.01)
        time.sleep(0.01)
    raise TimeoutError(f"{endpoint} not ready after {deadline:.0f}s")


@contextlib.contextmanager
def published_block(env: Env, client: Client, volume_id: str, *where: str) -> Iterator[str]:
    """Stage and publish a volume as a block device under env.path(*where); its device path,
    taken down again afterwards."""
    cap = block_cap()
    stage, pub = env.path(where[0], "stage", *where[1:]), env.path(where[0], "pub", *where[1:])
    os.makedirs(os.path.dirname(stage), exist_ok=True)
    os.makedirs(os.path.dirname(pub), exist_ok=True)
    client.stage(volume_id, stage, cap)
    client.publish(volume_id, stage, pub, cap)
    try:
        yield pub
    finally:
        client.unpublish(volume_id, pub)
        client.unstage(volume_id, stage)
