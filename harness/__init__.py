"""The development harness: pools on loop-mounted image files and driver processes, for the
tests and the bench (`make run` uses the same pool code through `stowagectl pool`).

Not shipped: the runtime package is `driver` (pyproject packages `driver*`); this package is
imported from a checkout only (tests, `python -m bench`).

    Workspace()                      a temporary directory that owns what is made in it
      .path(*parts)                  a path inside it
      .pool(name, fs_type, size, *, direct_io, sector_size, mount_options) -> Pool
                                     a pool filesystem on <base>/<name>.img, loop-attached and
                                     mounted at <base>/<name> by driver.ctl.pool.create (the
                                     code of `stowagectl pool create`)
      .spawn(argv, log_name, env)    a child process, output in <base>/<log_name>
      .stop(proc)                    SIGTERM, SIGKILL after a timeout; by PID only
      .cleanup() -> notes            stop its processes, thaw and unmount everything under
                                     base (deepest first), take its pools down
                                     (driver.ctl.pool.destroy), detach loop devices backed by
                                     files under base, remove base; RuntimeError, removing
                                     nothing, if something stays mounted or attached
    make_pool(fs_type, size) -> (Pool, teardown)
                                     a workspace with one pool named "pool"; teardown cleans
                                     the workspace up
    DriverProcess(pool, *args, node_id=, name=, mode=)
                                     `python -m driver --mode all` on the pool, socket
                                     <base>/<name>.sock, log <base>/<name>.log; `env` and
                                     `extra` may be changed between starts
      .start() -> Client             waits until Probe says ready (`ready_seconds` records how
                                     long that took); fails with the log's tail
      .stop(sig=SIGTERM) -> exit status, .log(), .rss_bytes()
    wait_ready(endpoint, proc, deadline) -> Client
                                     a client once the plugin `proc` serves says ready
    read_log(path), wait_for(predicate, timeout, what), REPO

Nothing outside the workspace directory is touched: only mounts under it are unmounted, only
loop devices whose backing file lies under it are detached, only processes it started are
signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from csi_proto import csi_pb2
from driver.ctl import pool as devpool
from driver.ctl.client import Client, probe_ready
from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = [
    "REPO", "DriverProcess", "Pool", "Workspace", "make_pool", "read_log", "wait_for", "wait_ready",
]


@dataclass(frozen=True)
class Pool:
    name: str
    base: str  # the workspace directory
    image: str
    mount: str
    fs_type: str
    device: str  # the loop device
    direct_io: bool  # whether the loop device does direct I/O (the kernel may refuse it)
    workspace: Workspace = field(repr=False, compare=False)


class Workspace:
    def __init__(self, prefix: str = "stowage-") -> None:
        self.base = tempfile.mkdtemp(prefix=prefix)
        self.runner = SubprocessRunner()
        self.loops = LoopManager(self.runner)
        self.pools: list[Pool] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    # --- pools ----------------------------------------------------------------------------------
    def pool(
        self,
        name: str = "pool",
        fs_type: str = "xfs",
        size: int = 256 << 30,
        *,
        direct_io: bool = False,
        sector_size: int = 512,
        mount_options: Sequence[str] = (),
    ) -> Pool:
        made = devpool.create(
            self.path(name + ".img"),
            self.path(name),
            size,
            fs_type,
            self.runner,
            direct_io=direct_io,
            sector_size=sector_size,
            mount_options=mount_options,
        )
        p = Pool(
            name, self.base, made.image, made.mount, fs_type, made.device, made.direct_io, self
        )
        self.pools.append(p)
        return p

    # --- processes ------------------------------------------------------------------------------
    def spawn(
        self, argv: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.path(log_name), "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches us, and we stop the child by PID
            )
        self._procs.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60.0
    ) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)
        return code

    # --- clean-up -------------------------------------------------------------------------------
    def _ours(self) -> tuple[list[str], list[str]]:
        prefix = self.base + os.sep
        mounts = [e.mount_point for e in mountinfo.mounts_under(self.base)]
        loops = [lo.device for lo in self.loops.devices() if lo.backing_file.startswith(prefix)]
        return mounts, loops

    def cleanup(self) -> list[str]:
        """Stop our processes, unmount and detach everything under base, remove base."""
        notes = [f"stopped pid {p.pid} ({self.stop(p, timeout=30)})" for p in list(self._procs)]
        pool_mounts = {p.mount for p in self.pools}
        for attempt in range(3):
            if attempt:
                time.sleep(0.5)  # a process just stopped may still hold a mount for a moment
            for entry in reversed(mountinfo.mounts_under(self.base)):  # newest first
                if entry.mount_point not in pool_mounts:
                    # A filesystem left frozen (a failed snapshot crash test) would outlive its
                    # unmount and keep its loop device busy: thaw first, errors ignored.
                    self.runner.run(["fsfreeze", "-u", entry.mount_point], check=False)
                    self.runner.run(["umount", "--", entry.mount_point], check=False)
            for p in self.pools:
                try:
                    notes += devpool.destroy(p.image, p.mount, self.runner)
                except Exception as exc:  # noqa: BLE001 - retried, then reported below
                    notes.append(f"taking {p.mount} down: {exc}")
            for device in self._ours()[1]:
                self.runner.run(["losetup", "--detach", device], check=False)
            mounts, loops = self._ours()
            if not mounts and not loops:
                shutil.rmtree(self.base)
                return [*notes, f"removed {self.base}"]
        raise RuntimeError(f"NOT removing {self.base}: still mounted {mounts}, attached {loops}")


def make_pool(fs_type: str = "xfs", size: int = 256 << 30) -> tuple[Pool, Callable[[], None]]:
    """A workspace with one pool; the second value tears the workspace down."""
    ws = Workspace("stowage-test-")
    try:
        made = ws.pool("pool", fs_type, size)
    except BaseException:
        ws.cleanup()
        raise

    def teardown() -> None:
        ws.cleanup()

    return made, teardown


def read_log(path: str) -> str:
    """A process's log file so far ("" before it exists)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_ready(endpoint: str, proc: subprocess.Popen[bytes], deadline: float) -> Client:
    """A client of the CSI plugin `proc` serves on `endpoint` (unix://) once its Probe says
    ready, polled every 10 ms; RuntimeError when the process exits first."""
    end = time.monotonic() + deadline
    sock = endpoint.removeprefix("unix://")
    # The channel is made once the socket exists: a channel that failed to connect backs off
    # for a second or more, which would blur start-up times.
    while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    client = Client(endpoint, timeout=300)
    while proc.poll() is None and time.monotonic() < end:
        try:
            if probe_ready(client.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)):
                return client
        except grpc.RpcError:
            pass
        time.sleep(0.01)
    client.close()
    if proc.poll() is not None:
        raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before ready")
    raise TimeoutError(f"{endpoint} not ready after {deadline:.0f}s")


class DriverProcess:
    """`python -m driver` on a pool, started and stopped by PID."""

    def __init__(
        self,
        pool: Pool,
        *extra: str,
        node_id: str = "test-node",
        name: str = "driver",
        mode: str = "all",
    ) -> None:
        self.pool = pool
        self.workspace = pool.workspace
        self.socket = self.workspace.path(name + ".sock")
        self.endpoint = "unix://" + self.socket
        self.log_path = self.workspace.path(name + ".log")
        self.extra = list(extra)
        self.node_id = node_id
        self.mode = mode
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds = 0.0  # from the last start() to Probe saying ready

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "driver", "--mode", self.mode, "--endpoint", self.endpoint,
            "--pool-dir", self.pool.mount, "--node-id", self.node_id, *self.extra,
        ]  # fmt: skip

    def start(self, deadline: float = 120.0) -> Client:
        started = time.monotonic()
        self.proc = self.workspace.spawn(self.argv(), os.path.basename(self.log_path), self.env)
        try:
            client = wait_ready(self.endpoint, self.proc, deadline)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            tail = "".join(self.log().splitlines(keepends=True)[-30:])
            raise AssertionError(f"driver did not become ready ({exc}):\n{tail}") from None
        self.ready_seconds = time.monotonic() - started
        return client

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        code = self.workspace.stop(self.proc, sig)
        self.proc = None
        return code

    def log(self) -> str:
        return read_log(self.log_path)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
