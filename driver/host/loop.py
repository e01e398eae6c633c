"""Loop devices: one per image, direct I/O verified through sysfs.

sysfs names a loop's backing file by its path as seen from the reader's root. A file opened in a
mount namespace that is gone (the node plugin's container before a restart or an upgrade: it
attached the loop through its own bind mount of the pool) is named by its path below the root
of the mount it was opened through (`/volumes/v-….img`). Such a path is resolved again through
the mounts of this namespace, confirmed by the device and inode the kernel reports for the loop
(LOOP_GET_STATUS64), so a restarted driver still finds the loops of its volumes.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from driver.errors import CommandFailed, Internal
from driver.host import mountinfo
from driver.host.exec import Runner

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/block"
_DELETED = " (deleted)"
LOOP_GET_STATUS64 = 0x4C05
_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")  # struct loop_info64
BackingId = Callable[[str], "tuple[int, int] | None"]  # /dev/loopN -> (st_dev, st_ino)


def kernel_backing_id(device: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the loop's backing file as the kernel holds it."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_INFO64.size))
    except OSError:
        return None
    finally:
        os.close(fd)
    dev, ino = _INFO64.unpack(buf)[:2]
    major, minor = (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)  # new_encode_dev
    return os.makedev(major, minor), ino


@dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    backing_file: str
    direct_io: bool
    deleted: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.device)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return fh.read().strip()
    except OSError:
        return ""


class LoopManager:
    def __init__(
        self, runner: Runner, sys_block: str = SYS_BLOCK, backing_id: BackingId | None = None
    ) -> None:
        self._runner = runner
        self._sys_block = sys_block
        # /dev/loopN answers for the real sysfs only; another sysfs root brings its own.
        self._backing_id = backing_id or (kernel_backing_id if sys_block == SYS_BLOCK else None)

    def _resolve(self, backing: str, device: str) -> str:
        """`backing` if it exists here, else its path through this namespace's mounts of the
        loop's filesystem when that file is the loop's (device and inode); else unchanged."""
        if os.path.lexists(backing) or self._backing_id is None:
            return backing
        held = self._backing_id(device)
        if held is None:
            return backing
        dev, ino = held
        for m in mountinfo.read():
            if os.makedev(m.major, m.minor) != dev:
                continue
            root = m.root.rstrip("/")
            if backing != root and not backing.startswith(root + "/"):
                continue
            candidate = m.mount_point.rstrip("/") + backing[len(root) :]
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                return candidate
        return backing

    def devices(self) -> list[LoopDevice]:
        devices = []
        for loop_dir in sorted(glob.glob(os.path.join(self._sys_block, "loop*"))):
            backing = _read(os.path.join(loop_dir, "loop", "backing_file"))
            if not backing:
                continue
            deleted = backing.endswith(_DELETED)
            device = "/dev/" + os.path.basename(loop_dir)
            backing = backing[: -len(_DELETED)] if deleted else self._resolve(backing, device)
            devices.append(
                LoopDevice(
                    device=device,
                    backing_file=backing,
                    direct_io=_read(os.path.join(loop_dir, "loop", "dio")) == "1",
                    deleted=deleted,
                )
            )
        return devices

    def by_backing_file(self) -> dict[str, list[LoopDevice]]:
        """Every live loop device grouped by its backing file: one sysfs pass for callers that
        look up many images (start-up reconciliation), where find() per image is quadratic."""
        out: dict[str, list[LoopDevice]] = {}
        for dev in self.devices():
            if not dev.deleted:
                out.setdefault(dev.backing_file, []).append(dev)
        return out

    def find(self, image: str) -> list[LoopDevice]:
        """Every loop device currently backed by `image` (there should be at most one).

        Reads only `backing_file` of each device and the rest of a match: with hundreds of
        loop devices every sysfs read counts (this runs on each stage and publish)."""
        real = os.path.realpath(image)
        found = []
        for loop_dir in sorted(glob.glob(os.path.join(self._sys_block, "loop*"))):
            backing = _read(os.path.join(loop_dir, "loop", "backing_file"))
            if backing != real and not (
                real.endswith(backing)  # a path below its filesystem's root only (see above)
                and backing.startswith("/")
                and self._resolve(backing, "/dev/" + os.path.basename(loop_dir)) == real
            ):
                continue  # "(deleted)" backings never equal a live path
            found.append(
                LoopDevice(
                    device="/dev/" + os.path.basename(loop_dir),
                    backing_file=real,
                    direct_io=_read(os.path.join(loop_dir, "loop", "dio")) == "1",
                )
            )
        return found

    def attach(self, image: str, *, sector_size: int = 512, direct_io: bool = True) -> LoopDevice:
        """Reuse the loop device already backed by `image`, or attach a new one."""
        existing = self.find(image)
        if len(existing) > 1:
            raise Internal(
                f"image {image} is attached to {len(existing)} loop devices "
                f"({', '.join(d.device for d in existing)}); refusing to use any of them"
            )
        if existing:
            return existing[0]
        argv = ["losetup", "--find", "--show", f"--sector-size={sector_size}"]
        if direct_io:
            argv.append("--direct-io=on")
        argv.append(image)
        try:
            self._runner.run(argv)
        except CommandFailed:
            # Some util-linux releases attach the device and then exit 1 when direct I/O could
            # not be switched on; look before retrying or a second loop device would appear.
            attached = self.find(image)
            if not attached:
                if not direct_io:
                    raise
                log.warning("losetup with direct I/O failed for %s; retrying without", image)
                return self.attach(image, sector_size=sector_size, direct_io=False)
        found = self.find(image)
        if len(found) != 1:
            raise Internal(f"losetup reported success but {image} has {len(found)} loop devices")
        dev = found[0]
        if direct_io and not dev.direct_io:
            log.warning("kernel refused direct I/O on %s for %s", dev.device, image)
        return dev

    def detach(self, device: str) -> None:
        name = os.path.basename(device)
        if not _read(os.path.join(self._sys_block, name, "loop", "backing_file")):
            return  # already detached
        self._runner.run(["losetup", "--detach", device])

    def refresh_capacity(self, device: str) -> None:
        self._runner.run(["losetup", "--set-capacity", device])

    def size_bytes(self, device: str) -> int:
        sectors = _read(os.path.join(self._sys_block, os.path.basename(device), "size"))
        return int(sectors) * 512 if sectors.isdigit() else 0
