"""The bench's settings on the development harness (`harness/`, whose docstring lists its
names): pools attached like disks, drivers quiet. Nothing here makes or cleans anything itself;
the harness's Workspace owns every pool, mount, loop device and process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from driver.ctl.client import Client, block_cap
from harness import DriverProcess, Pool, Workspace


def disk_pool(ws: Workspace, name: str, fs_type: str = "xfs") -> Pool:
    """A pool filesystem on a sparse file, attached like a disk: loop device with direct I/O
    (so neither side of a comparison runs from the host's page cache through the pool) and
    4096-byte sectors, formatted on the device."""
    return ws.pool(name, fs_type, direct_io=True, sector_size=4096)


def bench_driver(pool: Pool, name: str, *extra: str) -> DriverProcess:
    """`python -m driver --mode all` on `pool`, socket and log `<name>.sock|log`."""
    return DriverProcess(pool, "--log-level", "warning", *extra, name=name, node_id="bench-node")


@contextlib.contextmanager
def published_block(ws: Workspace, client: Client, volume_id: str, *where: str) -> Iterator[str]:
    """Stage and publish a volume as a block device under ws.path(*where); its device path,
    taken down again afterwards."""
    cap = block_cap()
    stage, pub = ws.path(where[0], "stage", *where[1:]), ws.path(where[0], "pub", *where[1:])
    os.makedirs(os.path.dirname(stage), exist_ok=True)
    os.makedirs(os.path.dirname(pub), exist_ok=True)
    client.stage(volume_id, stage, cap)
    client.publish(volume_id, stage, pub, cap)
    try:
        yield pub
    finally:
        client.unpublish(volume_id, pub)
        client.unstage(volume_id, stage)
