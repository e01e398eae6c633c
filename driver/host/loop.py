"""Loop devices: one per image, direct I/O verified through sysfs."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

from driver.errors import CommandFailed, Internal
from driver.host.exec import Runner

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/block"
_DELETED = " (deleted)"


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
    def __init__(self, runner: Runner, sys_block: str = SYS_BLOCK) -> None:
        self._runner = runner
        self._sys_block = sys_block

    def devices(self) -> list[LoopDevice]:
        devices = []
        for loop_dir in sorted(glob.glob(os.path.join(self._sys_block, "loop*"))):
            backing = _read(os.path.join(loop_dir, "loop", "backing_file"))
            if not backing:
                continue
            deleted = backing.endswith(_DELETED)
            if deleted:
                backing = backing[: -len(_DELETED)]
            devices.append(
                LoopDevice(
                    device="/dev/" + os.path.basename(loop_dir),
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
            if _read(os.path.join(loop_dir, "loop", "backing_file")) != real:
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
