"""Parse /proc/self/mountinfo (never the output of `mount`, which is ambiguous)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def dev(self) -> int:
        return os.makedev(self.major, self.minor)


def parse(text: str) -> list[MountEntry]:
    entries: list[MountEntry] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 6 or len(rf) < 3:
            continue
        major, _, minor = lf[2].partition(":")
        entries.append(
            MountEntry(
                mount_id=int(lf[0]),
                parent_id=int(lf[1]),
                major=int(major),
                minor=int(minor),
                root=_unescape(lf[3]),
                mount_point=_unescape(lf[4]),
                options=tuple(lf[5].split(",")),
                fs_type=rf[0],
                source=_unescape(rf[1]),
                super_options=tuple(rf[2].split(",")),
            )
        )
    return entries


def read(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return parse(fh.read())


def mounts_at(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Every mount whose mount point is exactly `path` (stacked mounts, oldest first)."""
    target = os.path.normpath(path)
    return [e for e in (entries if entries is not None else read()) if e.mount_point == target]


def top_mount_at(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    found = mounts_at(path, entries)
    return found[-1] if found else None


def _rdev(device: str) -> int | None:
    try:
        return os.stat(device).st_rdev
    except OSError:
        return None


def is_on(entry: MountEntry, device: str, rdev: int | None = None) -> bool:
    """True when `entry` mounts the filesystem on block device `device`, or binds the device
    node itself (a published raw block volume). btrfs reports an anonymous major:minor in
    mountinfo, so the source path counts as well as the device number."""
    if entry.source == device:
        return True
    if entry.fs_type == "devtmpfs" and entry.root == "/" + os.path.basename(device):
        return True
    rdev = _rdev(device) if rdev is None else rdev
    return rdev is not None and entry.dev == rdev


def mounts_of(
    device: str, entries: list[MountEntry] | None = None, rdev: int | None = None
) -> list[MountEntry]:
    """Every mount of the filesystem on `device` and every bind of its device node."""
    rdev = _rdev(device) if rdev is None else rdev
    return [e for e in (entries if entries is not None else read()) if is_on(e, device, rdev)]


def mounts_under(prefix: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    base = os.path.normpath(prefix)
    return [
        e
        for e in (entries if entries is not None else read())
        if e.mount_point == base or e.mount_point.startswith(base + "/")
    ]
