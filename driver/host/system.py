"""The real host: /proc/self/mountinfo, device nodes, statvfs, sysfs error counters, chown."""

from __future__ import annotations

import os
import stat

from driver.errors import FailedPrecondition
from driver.host import cgroups, mountinfo
from driver.host.base import FsUsage
from driver.host.mountinfo import MountEntry
from driver.model import FsType, IoLimits


class SystemHost:
    def mounts(self) -> list[MountEntry]:
        return mountinfo.read()

    def rdev(self, path: str) -> int | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_rdev if stat.S_ISBLK(st.st_mode) else None

    def fs_usage(self, mount_point: str) -> FsUsage:
        st = os.statvfs(mount_point)
        return FsUsage(
            total_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            available_bytes=st.f_bavail * st.f_frsize,
            total_inodes=st.f_files,
            used_inodes=st.f_files - st.f_ffree,
            available_inodes=st.f_favail,
        )

    def fs_errors(self, device: str, fs_type: FsType | None) -> int:
        if fs_type is not FsType.EXT4:
            return 0
        path = f"/sys/fs/ext4/{os.path.basename(device)}/errors_count"
        try:
            with open(path, encoding="ascii") as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def give_group(self, root: str, gid: int) -> None:
        """Like kubelet's fsGroup with fsGroupChangePolicy OnRootMismatch: nothing to do when
        the root already has the group and its setgid bit."""
        st = os.lstat(root)
        if st.st_gid == gid and st.st_mode & stat.S_ISGID:
            return
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                _chgrp(os.path.join(dirpath, name), gid)
            _chgrp(dirpath, gid)


    def set_io_limits(self, pod_uid: str, device: str, limits: IoLimits) -> int:
        hierarchy = cgroups.io_hierarchy(self.mounts())
        if hierarchy is None:
            if limits.unlimited:
                return 0
            raise FailedPrecondition(
                "this node has no block I/O cgroup controller (neither v1 blkio nor v2 io) "
                "to apply I/O limits with"
            )
        rdev = self.rdev(device)
        if rdev is None:
            raise FailedPrecondition(f"{device} is not a block device")
        return cgroups.apply(hierarchy, pod_uid, os.major(rdev), os.minor(rdev), limits)


def _chgrp(path: str, gid: int) -> None:
    st = os.lstat(path)
    os.lchown(path, -1, gid)
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode) | stat.S_IRGRP | stat.S_IWGRP
    if stat.S_ISDIR(st.st_mode):
        mode |= stat.S_IXGRP | stat.S_ISGID
    os.chmod(path, mode)
