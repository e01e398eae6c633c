"""Filesystems on a device: probe, format (only when safe), check, grow, freeze, trim."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from driver.errors import CommandFailed, FailedPrecondition, Internal, InvalidArgument
from driver.host.exec import Runner
from driver.model import FsType, MiB

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FITRIM = 0xC0185879  # _IOWR('X', 121, struct fstrim_range {u64 start, len, minlen})


@dataclass(frozen=True)
class FsSpec:
    """Everything Stowage knows about one filesystem type."""

    mkfs: tuple[str, ...]  # argv; the device is appended
    min_size: int  # the smallest filesystem mkfs makes with these options
    mount_options: tuple[str, ...]  # added to every mount of it
    fsck: bool  # repaired (e2fsck -p) before mounting; False: its log replays at mount, and
    # its offline repair tool is not safe to run unattended
    grows_offline: bool  # True: grown before mounting (resize2fs needs no capability then)
    grow: tuple[str, ...]  # online growth argv; "{device}" and "{mount}" are filled in


# Our mkfs options: no reserved blocks, lazy init where it is safe, no discard of a sparse
# image (the file is already sparse; discarding would only cost time). Clones and restores of
# an xfs volume share its UUID, so xfs is mounted nouuid or a clone could not be staged next
# to its origin.
FILESYSTEMS: dict[FsType, FsSpec] = {
    FsType.EXT4: FsSpec(
        mkfs=(
            "mkfs.ext4",
            "-F",
            "-q",
            "-m0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ),
        min_size=1 * MiB,
        mount_options=(),
        fsck=True,
        grows_offline=True,
        grow=("resize2fs", "--", "{device}"),
    ),
    FsType.XFS: FsSpec(
        mkfs=("mkfs.xfs", "-f", "-q", "-K"),
        min_size=300 * MiB,
        mount_options=("nouuid",),
        fsck=False,
        grows_offline=False,
        grow=("xfs_growfs", "{mount}"),
    ),
    FsType.BTRFS: FsSpec(
        mkfs=("mkfs.btrfs", "-f", "-q", "-K"),
        min_size=128 * MiB,
        mount_options=(),
        fsck=False,
        grows_offline=False,
        grow=("btrfs", "filesystem", "resize", "max", "{mount}"),
    ),
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

    def format(self, device: str, fs_type: FsType) -> None:
        self._runner.run([*FILESYSTEMS[fs_type].mkfs, device], timeout=600)

    def check(self, device: str, fs_type: FsType) -> None:
        """Repair what is safe to repair before mounting (`FsSpec.fsck`)."""
        if not FILESYSTEMS[fs_type].fsck:
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

    def grow_offline(self, device: str, fs_type: FsType) -> None:
        """Grow an unmounted ext4 filesystem (resize2fs wants a forced check first)."""
        if not FILESYSTEMS[fs_type].grows_offline:
            raise InvalidArgument(f"offline growth is only done for ext4, not {fs_type}")
        res = self._runner.run(["e2fsck", "-f", "-p", "--", device], check=False, timeout=3600)
        if res.returncode not in (0, 1):
            raise FailedPrecondition(
                f"e2fsck -f found errors on {device} (status {res.returncode}); not resizing"
            )
        self._runner.run(["resize2fs", "--", device], timeout=3600)

    def grow(self, device: str, mount_point: str, fs_type: FsType) -> None:
        """Grow a mounted filesystem to fill its device (idempotent)."""
        argv = [a.format(device=device, mount=mount_point) for a in FILESYSTEMS[fs_type].grow]
        res = self._runner.run(argv, check=False, timeout=3600)
        if res.returncode == 0:
            return
        if fs_type == FsType.EXT4 and "Permission denied" in res.stderr:
            raise FailedPrecondition(
                f"the kernel refused to resize ext4 on {device} while mounted (online "
                "ext4 growth needs CAP_SYS_RESOURCE); the image is already larger and "
                "the filesystem will grow when the volume is next staged"
            )
        raise CommandFailed(res.argv, res.returncode, res.stdout, res.stderr)

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
    def trim(mount_point: str) -> int | None:
        """Discard the free space of a mounted filesystem (what fstrim does), after writing its
        dirty state out (ext4 frees a deleted file's blocks only when its journal commits). On
        a loop device the discards punch holes in the image, so deleted files neither occupy
        the pool nor are carried into backups. Returns the bytes the filesystem trimmed, None
        when it or its device cannot discard."""
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise Internal(f"could not sync {mount_point}: {os.strerror(err)}")
            rng = bytearray(struct.pack("=QQQ", 0, (1 << 64) - 1, 0))
            try:
                fcntl.ioctl(fd, FITRIM, rng, True)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                    return None
                raise Internal(f"could not trim {mount_point}: {exc}") from exc
            return int(struct.unpack("=QQQ", rng)[1])
        finally:
            os.close(fd)

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
