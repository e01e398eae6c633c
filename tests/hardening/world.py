"""A driver on a real pool that tests can crash, reboot and inspect, with the invariants of
issue 7 checked in one place."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from csi_proto import csi_pb2
from driver.core.check import Findings
from driver.ctl import local
from driver.ctl.client import Client, capability
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from driver.host.system import SystemHost
from harness import DriverProcess, Pool, make_pool
from tests.integration.helpers import MiB, sha256, write_random


@dataclass
class Placed:
    """A volume staged and published under the test directory, with the digest of its data."""

    volume_id: str
    staging: str
    target: str
    block: bool
    fs_type: str
    digest: str = ""

    @property
    def data(self) -> str:
        return self.target if self.block else os.path.join(self.target, "data")

    @property
    def cap(self) -> csi_pb2.VolumeCapability:
        return capability(self.block, self.fs_type)


@dataclass
class World:
    pool: Pool
    driver: DriverProcess
    client: Client
    told_exist: set[str] = field(default_factory=set)  # volume and snapshot IDs the CO was given
    told_deleted: set[str] = field(default_factory=set)
    placed: list[Placed] = field(default_factory=list)

    # --- process control --------------------------------------------------------------------
    def restart(self, faults: str = "") -> None:
        self.client.close()
        self.driver.stop()
        self.driver.env = {"STOWAGE_FAULTS": faults} if faults else {}
        self.client = self.driver.start()

    def expect_crash(self, point: str) -> None:
        """The call just made must have ended the driver at `point`, as kill -9 would."""
        proc = self.driver.proc
        assert proc is not None
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver did not die at {point}:\n{self.driver.log()}") from None
        self.driver.proc = None
        assert code == -9, f"driver exited {code}, not by SIGKILL at {point}"
        assert f"fault point {point} reached" in self.driver.log()
        self.client.close()
        self.driver.env = {}
        self.client = self.driver.start()  # start-up reconciliation runs before Probe is ready

    # --- volumes ----------------------------------------------------------------------------
    def create(self, name: str, size: int = 64 * MiB, *, block: bool = False, fs: str = "") -> str:
        vol = self.client.create_volume(name, size, capability(block, fs))
        self.told_exist.add(vol.volume_id)
        return vol.volume_id

    def place(
        self, volume_id: str, *, block: bool = False, fs: str = "ext4", mib: int = 4
    ) -> Placed:
        """Stage, publish and fill a volume with random bytes."""
        p = Placed(
            volume_id,
            os.path.join(self.pool.base, f"staging-{volume_id}"),
            os.path.join(self.pool.base, f"target-{volume_id}"),
            block,
            "" if block else fs,
        )
        os.makedirs(p.staging, exist_ok=True)
        self.client.stage(volume_id, p.staging, p.cap)
        self.client.publish(volume_id, p.staging, p.target, p.cap)
        p.digest = write_random(p.data, mib) if not block else _write_block(p.data, mib)
        self.placed.append(p)
        return p

    def unplace(self, p: Placed) -> None:
        self.client.unpublish(p.volume_id, p.target)
        self.client.unstage(p.volume_id, p.staging)
        self.placed.remove(p)

    def digest_of(self, p: Placed, mib: int = 4) -> str:
        return sha256(p.data) if not p.block else _read_block(p.data, mib)

    # --- invariants -------------------------------------------------------------------------
    def check(self) -> Findings:
        """`stowagectl check` of the pool, on this host's mount table and loop devices."""
        return local.check(self.pool.mount, SystemHost(), LoopManager(SubprocessRunner()))

    def check_invariants(self) -> None:
        found = self.check()
        assert found.ok, "stowagectl check found problems:\n" + "\n".join(found.problems)
        listed_vols = {e.volume.volume_id for e in self.client.list_volumes()}
        listed_snaps = {e.snapshot.snapshot_id for e in self.client.list_snapshots()}
        listed = listed_vols | listed_snaps
        missing = self.told_exist - self.told_deleted - listed
        assert not missing, f"the CO was told these exist, they do not: {missing}"
        back = (self.told_deleted & listed) | {
            i for i in self.told_deleted if self._image_in_pool(i)
        }
        assert not back, f"deleted but still present outside trash: {back}"
        for p in self.placed:
            assert self.digest_of(p) == p.digest, f"data of {p.volume_id} changed"
            if not p.block:
                assert_writable(p.target)
            loops = loops_of(self.pool, p.volume_id)
            assert len(loops) == 1, f"{p.volume_id} has loop devices {loops}"

    def _image_in_pool(self, object_id: str) -> bool:
        return any(
            name.startswith(object_id)
            for d in ("volumes", "snapshots")
            for name in os.listdir(os.path.join(self.pool.mount, d))
        )

    def tidy(self) -> None:
        """Unpublish and unstage what the test placed, through the driver, best effort."""
        for p in list(self.placed):
            with contextlib.suppress(grpc.RpcError):
                self.unplace(p)


def loops_of(pool: Pool, volume_id: str) -> list[str]:
    image = os.path.join(pool.mount, "volumes", volume_id + ".img")
    return [
        lo.device for lo in LoopManager(SubprocessRunner()).devices() if lo.backing_file == image
    ]


def assert_writable(mount_point: str, timeout: float = 15.0) -> None:
    """A write must complete: a filesystem left frozen by a crash would hang it forever."""
    proc = subprocess.Popen(
        ["dd", "if=/dev/zero", f"of={mount_point}/.writable", "bs=4k", "count=1", "conv=fsync"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    if proc.poll() is None:
        subprocess.run(["fsfreeze", "-u", mount_point], check=False)  # let the writer finish
        proc.wait()
        raise AssertionError(f"a write to {mount_point} hung: the filesystem was left frozen")
    assert proc.returncode == 0, f"a write to {mount_point} failed"
    os.unlink(f"{mount_point}/.writable")


def _write_block(device: str, mib: int) -> str:
    import hashlib

    data = os.urandom(mib * MiB)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def _read_block(device: str, mib: int) -> str:
    import hashlib

    fd = os.open(device, os.O_RDONLY)
    try:
        return hashlib.sha256(os.pread(fd, mib * MiB, 0)).hexdigest()
    finally:
        os.close(fd)


@contextlib.contextmanager
def running_world(
    *driver_args: str, fs_type: str = "xfs", size: int = 256 << 30
) -> Iterator[World]:
    """A fresh pool and a driver on it; everything undone afterwards, also on failure."""
    made, teardown = make_pool(fs_type, size)
    proc = DriverProcess(made, *driver_args)
    try:
        w = World(made, proc, proc.start())
        try:
            yield w
        finally:
            w.tidy()
            w.client.close()
    finally:
        proc.stop()
        teardown()
