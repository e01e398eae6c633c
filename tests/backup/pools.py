"""Loop-mounted pools for the root backup tests, torn down (unmount, detach) in `finally`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

M = 1 << 20

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "btrfs-zstd": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
OPTS = {"btrfs-zstd": ["-o", "compress-force=zstd"]}


def make_pool(kind: str) -> Iterator[str]:
    assert os.geteuid() == 0, "extent tests need root (loop devices, mkfs, mount)"
    base = tempfile.mkdtemp(prefix=f"stowage-extents-{kind}-")
    image, mnt = os.path.join(base, "pool.img"), os.path.join(base, "mnt")
    os.mkdir(mnt)
    dev = ""
    mounted = False
    try:
        with open(image, "wb") as fh:
            fh.truncate(512 * M)
        dev = subprocess.run(["losetup", "--find", "--show", image], check=True,
                             capture_output=True, text=True).stdout.strip()
        subprocess.run([*MKFS[kind], dev], check=True, capture_output=True)
        subprocess.run(["mount", *OPTS.get(kind, []), dev, mnt], check=True, capture_output=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=False)
        if dev:
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(base, ignore_errors=True)
