"""A pool on a file: an image formatted XFS (reflink=1) or another filesystem, loop-mounted.

Used by `stowagectl pool create|destroy` (the embedded default pool of `make run`) and by the
development harness (`harness/`: the pools of the tests and the bench). destroy() is safe to
call on a half-made pool: it unmounts whatever is mounted under the pool directory (deepest
first), detaches loop devices backed by files in the pool, refuses while a pool volume is
mounted outside the pool, and never removes anything else."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from driver.errors import CommandFailed, FailedPrecondition
from driver.host import mountinfo
from driver.host.exec import Runner, SubprocessRunner
from driver.host.loop import LoopManager

# Formatted on the loop device. No discard for ext4 (the image is already sparse); xfs with
# reflink, so that snapshots and clones are O(extents).
POOL_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-m0", "-E", "nodiscard"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


@dataclass(frozen=True)
class DevPool:
    image: str
    mount: str
    fs_type: str
    device: str  # the loop device it is mounted from
    direct_io: bool  # whether that loop device does direct I/O


def create(
    image: str,
    mount: str,
    size: int,
    fs_type: str = "xfs",
    runner: Runner | None = None,
    *,
    direct_io: bool = False,
    sector_size: int = 512,
    mount_options: Sequence[str] = (),
) -> DevPool:
    """Attach `image` (made `size` bytes sparse if it does not exist, then formatted) to a loop
    device and mount it at `mount`; an already mounted pool is returned as it is. With
    `direct_io` the loop device bypasses the host's page cache for the image (the bench
    attaches pools like disks: direct I/O, 4096-byte sectors)."""
    runner = runner or SubprocessRunner()
    image, mount = os.path.abspath(image), os.path.abspath(mount)
    os.makedirs(os.path.dirname(image), exist_ok=True)
    os.makedirs(mount, exist_ok=True)
    loops = LoopManager(runner)
    if mountinfo.mounts_at(mount):
        lo = next(iter(loops.find(image)), None)
        return DevPool(image, mount, fs_type, lo.device if lo else "", bool(lo and lo.direct_io))
    fresh = not os.path.exists(image)
    if fresh:
        with open(image, "wb") as fh:
            fh.truncate(size)
    loop = loops.attach(image, sector_size=sector_size, direct_io=direct_io)
    try:
        if fresh:
            runner.run([*POOL_MKFS[fs_type], loop.device], timeout=600)
        options = ["-o", ",".join(mount_options)] if mount_options else []
        runner.run(["mount", "-t", fs_type, *options, "--", loop.device, mount])
    except CommandFailed:
        loops.detach(loop.device)
        raise
    return DevPool(image, mount, fs_type, loop.device, loop.direct_io)


def destroy(
    image: str,
    mount: str,
    runner: Runner | None = None,
    *,
    remove_image: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Take down a pool made by `create`, touching only what it owns: mounts under `mount`
    (deepest first), loop devices backed by files in the pool, the pool mount, the loop device
    of `image`. A pool volume still mounted outside `mount` (staged or published somewhere) is
    refused, not unmounted. With `dry_run`, return the steps without taking any."""
    runner = runner or SubprocessRunner()
    image, mount = os.path.abspath(image), os.path.abspath(mount)
    loops = LoopManager(runner)
    pool_loops = [lo for lo in loops.devices() if lo.backing_file.startswith(mount + os.sep)]
    entries = mountinfo.read()
    inside = [e for e in mountinfo.mounts_under(mount, entries) if e.mount_point != mount]
    outside = [
        e
        for e in entries
        if not (e.mount_point == mount or e.mount_point.startswith(mount + os.sep))
        and any(mountinfo.is_on(e, lo.device) for lo in pool_loops)
    ]
    if outside:
        where = ", ".join(sorted({e.mount_point for e in outside}))
        raise FailedPrecondition(
            f"volumes of this pool are still mounted outside it ({where}); unpublish and "
            "unstage them first (nothing was changed)"
        )
    steps: list[tuple[str, list[str] | None, str]] = []
    for entry in sorted(inside, key=lambda e: -len(e.mount_point)):
        steps.append(("umount " + entry.mount_point, ["umount", "--", entry.mount_point], ""))
    for lo in pool_loops:
        steps.append(("detach " + lo.device, None, lo.device))
    if dry_run:
        out = [text for text, _, _ in steps]
        if mountinfo.mounts_at(mount, entries):
            out.append("umount " + mount)
        out += ["detach " + lo.device for lo in loops.find(image)]
        if remove_image and os.path.exists(image):
            out.append("remove " + image)
        return out
    done: list[str] = []
    for text, argv, device in steps:
        if argv is not None:
            runner.run(argv, check=False)
        else:
            loops.detach(device)
        done.append(text)
    while mountinfo.mounts_at(mount):
        runner.run(["umount", "--", mount])
        done.append("umount " + mount)
    for lo in loops.find(image):
        loops.detach(lo.device)
        done.append("detach " + lo.device)
    if remove_image and os.path.exists(image):
        os.unlink(image)
        done.append("remove " + image)
    return done
