"""Filesystems on a device: probe, format (only when safe), check, grow, freeze."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator

from driver.errors import CommandFailed, FailedPrecondition, Internal, InvalidArgument
from driver.host.exec import Runner

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

# Our mkfs options: no reserved blocks, lazy init where it is safe, no discard of a sparse
# image (the file is already sparse; discarding would only cost time).
MKFS = {
    "ext4": [
        "mkfs.ext4",
        "-F",
        "-q",
        "-m0",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    ],
    "xfs": ["mkfs.xfs", "-f", "-q", "-K"],
    "btrfs": ["mkfs.btrfs", "-f", "-q", "-K"],
}


class Filesystems:
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def probe(self, device: str) -> str | None:
        """The filesystem or partition-table signature on `device`, or None if there is none.

        Any error other than "nothing found" raises: an unreadable device is never treated
        as an empty one (that is how drivers have formatted disks full of data).
        """
        res = self._runner.run(
            ["blkid", "-p", "-o", "export", "--", device], check=False, timeout=60
        )
        if res.returncode == 2:
            return None
        if res.returncode != 0:
            raise Internal(
                f"blkid could not read {device} (status {res.returncode}); not formatting"
            )
        values = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        return values.get("TYPE") or values.get("PTTYPE") or "unknown"

    def format(self, device: str, fs_type: str) -> None:
        if fs_type not in MKFS:
            raise InvalidArgument(f"unsupported filesystem type {fs_type!r}")
        self._runner.run([*MKFS[fs_type], device], timeout=600)

    def check(self, device: str, fs_type: str) -> None:
        """Repair what is safe to repair before mounting (ext4 only: xfs and btrfs replay their
        logs at mount time, and their offline repair tools are not safe to run unattended)."""
        if fs_type != "ext4":
            return
        res = self._runner.run(["e2fsck", "-p", "--", device], check=False, timeout=3600)
        if res.returncode in (0, 1):
            return
        raise FailedPrecondition(
            f"e2fsck found errors it could not fix on {device} (status {res.returncode}): "
            f"{res.stdout.strip()[-300:]} {res.stderr.strip()[-300:]}; run e2fsck by hand"
        )

    def ext4_size(self, device: str) -> int:
        """Size of the (unmounted) ext4 filesystem on `device`, from its superblock."""
        out = self._runner.run(["dumpe2fs", "-h", "--", device], timeout=60).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in out.splitlines())
        )
        return int(fields["Block count"]) * int(fields["Block size"])

    def grow_offline(self, device: str, fs_type: str) -> None:
        """Grow an unmounted ext4 filesystem (resize2fs wants a forced check first)."""
        if fs_type != "ext4":
            raise InvalidArgument(f"offline growth is only done for ext4, not {fs_type}")
        res = self._runner.run(["e2fsck", "-f", "-p", "--", device], check=False, timeout=3600)
        if res.returncode not in (0, 1):
            raise FailedPrecondition(
                f"e2fsck -f found errors on {device} (status {res.returncode}); not resizing"
            )
        self._runner.run(["resize2fs", "--", device], timeout=3600)

    def grow(self, device: str, mount_point: str, fs_type: str) -> None:
        """Grow a mounted filesystem to fill its device (idempotent)."""
        if fs_type == "ext4":
            res = self._runner.run(["resize2fs", "--", device], check=False, timeout=3600)
            if res.returncode != 0:
                if "Permission denied" in res.stderr:
                    raise FailedPrecondition(
                        f"the kernel refused to resize ext4 on {device} while mounted (online "
                        "ext4 growth needs CAP_SYS_RESOURCE); the image is already larger and "
                        "the filesystem will grow when the volume is next staged"
                    )
                raise CommandFailed(res.argv, res.returncode, res.stdout, res.stderr)
        elif fs_type == "xfs":
            self._runner.run(["xfs_growfs", mount_point], timeout=3600)
        elif fs_type == "btrfs":
            self._runner.run(["btrfs", "filesystem", "resize", "max", mount_point], timeout=3600)
        else:
            raise InvalidArgument(f"cannot grow filesystem type {fs_type!r}")

    def size_bytes(self, mount_point: str) -> int:
        st = os.statvfs(mount_point)
        return st.f_blocks * st.f_frsize

    @staticmethod
    def thaw(mount_point: str) -> bool:
        """Thaw a filesystem a crashed process left frozen; False when it was not frozen."""
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not frozen: the normal case
                return False
            raise Internal(f"could not thaw {mount_point}: {exc}") from exc
        finally:
            os.close(fd)
        return True

    @staticmethod
    @contextlib.contextmanager
    def frozen(mount_point: str) -> Iterator[None]:
        """Freeze a mounted filesystem for the duration of the block; always thaw."""
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as exc:
                raise Internal(f"could not freeze {mount_point}: {exc}") from exc
            try:
                yield
            finally:
                try:
                    fcntl.ioctl(fd, FITHAW, 0)
                except OSError:
                    log.exception("could not thaw %s", mount_point)
        finally:
            os.close(fd)
