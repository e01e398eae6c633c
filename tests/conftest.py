"""Shared fixtures for the root tiers: a real pool on a loop-mounted image and a driver process.

Every fixture cleans up after itself even when the test fails: mounts under the test's own
temporary directory are unmounted, loop devices backed by its files are detached, and only then
is the directory removed. Processes are stopped by the PID the fixture started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from driver.ctl import pool as devpool
from driver.ctl.client import Client
from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The control-plane tier needs binaries `make e2e-tools` builds (tens of minutes cold); it runs
# through `make e2e`, which points STOWAGE_E2E_BIN at them, not as part of `make test`. The node
# tier (a kubelet and containerd besides) runs only through `make e2e-node`.
collect_ignore = [] if os.environ.get("STOWAGE_E2E_BIN") else ["e2e"]
if not os.environ.get("STOWAGE_E2E_NODE"):
    collect_ignore.append("e2e_node")
# Building the image twice (reproducibility) is slow: `make test-image` sets STOWAGE_IMAGE_BUILD.
if os.environ.get("STOWAGE_IMAGE_BUILD") != "1":
    collect_ignore.append("image/test_build.py")


@dataclass
class Pool:
    base: str
    image: str
    mount: str
    fs_type: str


def _teardown_dir(base: str, image: str, mount: str) -> None:
    runner = SubprocessRunner()
    for entry in reversed(mountinfo.mounts_under(base)):  # newest first
        if entry.mount_point != mount:
            # A filesystem left frozen (a failed test of snapshot crashes) would outlive its
            # unmount and keep its loop device busy: thaw first, errors ignored.
            runner.run(["fsfreeze", "-u", entry.mount_point], check=False)
            runner.run(["umount", "--", entry.mount_point], check=False)
    devpool.destroy(image, mount)
    loops = LoopManager(runner)
    for lo in loops.devices():
        if lo.backing_file.startswith(base + os.sep):
            loops.detach(lo.device)
    left = mountinfo.mounts_under(base)
    if left:
        raise RuntimeError(f"still mounted under {base}: {[e.mount_point for e in left]}")
    shutil.rmtree(base)


def make_pool(fs_type: str = "xfs", size: int = 256 << 30) -> tuple[Pool, Callable[[], None]]:
    base = tempfile.mkdtemp(prefix="stowage-test-")
    image = os.path.join(base, "pool.img")
    mount = os.path.join(base, "pool")
    try:
        devpool.create(image, mount, size, fs_type)
    except BaseException:
        _teardown_dir(base, image, mount)
        raise
    return Pool(base, image, mount, fs_type), lambda: _teardown_dir(base, image, mount)


@pytest.fixture
def pool() -> Iterator[Pool]:
    assert os.geteuid() == 0, "the integration tiers need root (loop devices, mkfs, mount)"
    made, teardown = make_pool()
    try:
        yield made
    finally:
        teardown()


def read_log(path: str) -> str:
    """A process's log file so far ("" before it exists)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


class DriverProcess:
    """`python -m driver --mode all` on a pool, started and stopped by PID."""

    def __init__(self, pool: Pool, *extra: str, node_id: str = "test-node") -> None:
        self.pool = pool
        self.socket = os.path.join(pool.base, "csi.sock")
        self.endpoint = "unix://" + self.socket
        self.log_path = os.path.join(pool.base, "driver.log")
        self.extra = list(extra)
        self.node_id = node_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    def start(self) -> Client:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "driver",
                "--mode",
                "all",
                "--endpoint",
                self.endpoint,
                "--pool-dir",
                self.pool.mount,
                "--node-id",
                self.node_id,
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **self.env},
        )
        log.close()
        client = Client(self.endpoint, timeout=60)
        try:
            client.wait_ready(30)
        except TimeoutError:
            self.stop()
            raise AssertionError("driver did not become ready:\n" + self.log()) from None
        return client

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def log(self) -> str:
        return read_log(self.log_path)


@pytest.fixture
def driver(pool: Pool) -> Iterator[DriverProcess]:
    proc = DriverProcess(pool)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(driver: DriverProcess) -> Iterator[Client]:
    c = driver.start()
    try:
        yield c
    finally:
        c.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
