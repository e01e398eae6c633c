"""A pool on a file: an image formatted XFS (reflink=1) or another filesystem, loop-mounted.

Used by `stowagectl pool create|destroy` (the embedded default pool of `make run`) and by the
test fixtures. destroy() is safe to call on a half-made pool: it unmounts whatever is mounted
under the pool directory (deepest first), detaches loop devices backed by files under the state
directory, and never removes anything outside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from driver.errors import CommandFailed
from driver.host import mountinfo
from driver.host.exec import Runner, SubprocessRunner
from driver.host.loop import LoopManager

POOL_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-m0"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


@dataclass(frozen=True)
class DevPool:
    image: str
    mount: str
    fs_type: str


def create(
    image: str, mount: str, size: int, fs_type: str = "xfs", runner: Runner | None = None
) -> DevPool:
    runner = runner or SubprocessRunner()
    image, mount = os.path.abspath(image), os.path.abspath(mount)
    os.makedirs(os.path.dirname(image), exist_ok=True)
    os.makedirs(mount, exist_ok=True)
    if mountinfo.mounts_at(mount):
        return DevPool(image, mount, fs_type)
    fresh = not os.path.exists(image)
    if fresh:
        with open(image, "wb") as fh:
            fh.truncate(size)
        runner.run([*POOL_MKFS[fs_type], image])
    loop = LoopManager(runner).attach(image, direct_io=False)
    try:
        runner.run(["mount", "-t", fs_type, "--", loop.device, mount])
    except CommandFailed:
        LoopManager(runner).detach(loop.device)
        raise
    return DevPool(image, mount, fs_type)


def destroy(
    image: str, mount: str, runner: Runner | None = None, *, remove_image: bool = False
) -> list[str]:
    """Unmount everything under `mount` (and pool volumes mounted elsewhere in the directory
    that holds it), detach loops of files in the pool and of `image`."""
    runner = runner or SubprocessRunner()
    image, mount = os.path.abspath(image), os.path.abspath(mount)
    done: list[str] = []
    loops = LoopManager(runner)
    pool_loops = [lo for lo in loops.devices() if lo.backing_file.startswith(mount + os.sep)]
    for entry in sorted(mountinfo.mounts_under(mount), key=lambda e: -len(e.mount_point)):
        if entry.mount_point != mount:
            runner.run(["umount", "--", entry.mount_point], check=False)
            done.append("umount " + entry.mount_point)
    # Staging and target mounts of pool volumes elsewhere in the state directory.
    scope = os.path.dirname(mount) + os.sep
    for entry in reversed(mountinfo.read()):
        if entry.mount_point.startswith(scope) and any(
            mountinfo.is_on(entry, lo.device) for lo in pool_loops
        ):
            runner.run(["umount", "--", entry.mount_point], check=False)
            done.append("umount " + entry.mount_point)
    for lo in pool_loops:
        loops.detach(lo.device)
        done.append("detach " + lo.device)
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
