"""Loop-mounted pools for the root backup tests, from the development harness (`harness/`):
torn down (unmount, detach, remove) in `finally`."""

from __future__ import annotations

import os
from collections.abc import Iterator

from harness import Workspace

M = 1 << 20

OPTS = {"btrfs-zstd": ("compress-force=zstd",)}


def make_pool(kind: str) -> Iterator[str]:
    """The mount point of a 512 MiB pool of `kind`: xfs (reflink), btrfs, btrfs-zstd (btrfs
    mounted compress-force=zstd) or ext4."""
    assert os.geteuid() == 0, "extent tests need root (loop devices, mkfs, mount)"
    ws = Workspace(f"stowage-extents-{kind}-")
    try:
        fs_type = "btrfs" if kind.startswith("btrfs") else kind
        yield ws.pool("pool", fs_type, 512 * M, mount_options=OPTS.get(kind, ())).mount
    finally:
        ws.cleanup()
