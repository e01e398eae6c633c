"""The host as core sees it, beyond the commands it runs (driver.host.exec.Runner) and the loop
devices (driver.host.loop): one typed interface, one real implementation
(driver.host.system.SystemHost) and one fake (tests/unit/fakes.FakeHost)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from driver.host.mountinfo import MountEntry
from driver.model import FsType, IoLimits


@dataclass(frozen=True)
class FsUsage:
    """statvfs of a mounted filesystem, in bytes and inodes."""

    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int


class Host(Protocol):
    def mounts(self) -> list[MountEntry]:
        """The mount table (never the output of `mount`)."""
        ...

    def rdev(self, path: str) -> int | None:
        """The device number of the block device node at `path`; None when it is not one."""
        ...

    def fs_usage(self, mount_point: str) -> FsUsage: ...

    def fs_errors(self, device: str, fs_type: FsType | None) -> int:
        """Errors the kernel counted on the filesystem on `device` (ext4 keeps a counter;
        0 where there is none)."""
        ...

    def give_group(self, root: str, gid: int) -> None:
        """VOLUME_MOUNT_GROUP: group ownership and group write access under `root`."""
        ...

    def set_io_limits(self, pod_uid: str, device: str, limits: IoLimits) -> int:
        """ModifyVolume: limit I/O to block device `device` from pod `pod_uid` (unlimited
        fields lift their limit). Returns how many cgroups were written, 0 when the pod has no
        cgroup on this node (yet). driver.host.cgroups says where and why."""
        ...
