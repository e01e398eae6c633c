"""Mount, bind and unmount without ever deleting recursively or following kubelet's symlinks."""

from __future__ import annotations

import errno
import logging
import os
import stat

from driver.errors import FailedPrecondition, Internal, InvalidArgument
from driver.host import mountinfo
from driver.host.base import Host
from driver.host.exec import Runner
from driver.model import FsType

log = logging.getLogger(__name__)

# Every volume we mount carries these unless an allowed flag says otherwise.
SAFE_DEFAULTS = ("nosuid", "nodev")


class Mounter:
    def __init__(self, runner: Runner, host: Host) -> None:
        self._runner = runner
        self._host = host

    # --- queries ---------------------------------------------------------------------------
    def is_mounted(self, path: str) -> bool:
        return bool(mountinfo.mounts_at(path, self._host.mounts()))

    # --- mounting ----------------------------------------------------------------------------
    def mount(self, source: str, target: str, fs_type: FsType, options: list[str]) -> None:
        argv = ["mount", "-t", fs_type]
        if options:
            argv += ["-o", ",".join(options)]
        self._runner.run([*argv, "--", source, target])

    def bind(self, source: str, target: str, *, readonly: bool, options: list[str]) -> None:
        """Bind-mount; the read-only and nosuid/nodev bits need a remount of the bind itself."""
        self._runner.run(["mount", "--bind", "--", source, target])
        flags = ["remount", "bind", *options]
        if readonly:
            flags.append("ro")
        try:
            self._runner.run(["mount", "-o", ",".join(flags), "--", target])
        except Exception:
            self.unmount(target)
            raise

    def unmount(self, target: str) -> None:
        """Unmount every layer mounted at `target`; a busy mount is an error, never forced."""
        for _ in range(16):
            if not self.is_mounted(target):
                return
            self._runner.run(["umount", "--", target])
        raise Internal(f"{target} is still mounted after 16 unmounts")

    # --- target paths ---------------------------------------------------------------------------
    @staticmethod
    def refuse_symlinks(path: str) -> None:
        """Refuse a path that has a symbolic link in any of its existing components: kubelet
        never makes one, and following it could take a mount or an rmdir outside kubelet's
        directories. `path` must be absolute and normalised."""
        real = os.path.realpath(path)
        if real != path:
            raise InvalidArgument(
                f"{path} passes through a symbolic link (it resolves to {real}); refusing it"
            )

    @staticmethod
    def ensure_dir(path: str) -> bool:
        """Create a directory target without following a symlink planted at it; True when this
        call created it."""
        _refuse_symlink(path)
        try:
            os.mkdir(path, 0o750)
        except FileExistsError:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"{path} exists and is not a directory") from None
            return False
        return True

    @staticmethod
    def ensure_file(path: str) -> None:
        """Create an empty regular file to bind a block device onto."""
        _refuse_symlink(path)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o640)
            os.close(fd)
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"{path} exists and is a directory") from None

    def remove_target(self, path: str) -> None:
        """Remove a target we created: rmdir or unlink, only after nothing is mounted there."""
        if self.is_mounted(path):
            raise FailedPrecondition(f"{path} is still mounted; not removing it")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise FailedPrecondition(
                    f"{path} is not empty after unmount; leaving it for an operator"
                ) from exc
            if exc.errno != errno.ENOENT:
                raise


def _refuse_symlink(path: str) -> None:
    if os.path.islink(path):
        raise InvalidArgument(f"{path} is a symbolic link; refusing to follow it")
    parent = os.path.dirname(os.path.normpath(path)) or "/"
    if not os.path.isdir(parent):
        raise InvalidArgument(f"parent directory {parent} of {path} does not exist")
    Mounter.refuse_symlinks(os.path.normpath(path))
