"""Everything a core service needs to act on the local pool, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from driver.errors import Unavailable
from driver.host.base import Host
from driver.host.fs import Filesystems
from driver.host.loop import LoopManager
from driver.host.mounter import Mounter
from driver.storage.base import VolumeBackend
from driver.storage.locks import KeyedLocks
from driver.storage.store import Store

# Below this much free space the pool counts as full for volume conditions.
POOL_FULL_BYTES = 16 * 1024 * 1024


@dataclass
class PoolContext:
    node_id: str
    store: Store
    backend: VolumeBackend
    locks: KeyedLocks
    loops: LoopManager
    mounter: Mounter
    fs: Filesystems
    host: Host
    max_volumes_per_node: int = 0
    loop_sector_size: int = 4096

    def require_healthy(self) -> None:
        """Refuse a call before it acts when the pool's directories are gone or read-only.

        The metadata store is not probed here: every core operation reads the store before it
        changes anything, and a failing read already raises Unavailable. Probe checks both."""
        if not self.backend.healthy():
            raise Unavailable("the storage pool is unusable on this node")

    def starved(self, volume_id: str, size: int) -> str:
        """Why writes into this thin volume may fail for lack of pool space, or "".

        Images are sparse: a write into a never-written region needs a free block in the pool.
        When the pool is (nearly) full those writes fail with EIO inside the volume; the
        condition says so instead of leaving it to the application to notice."""
        usage = self.backend.usage()
        if usage.free_bytes >= POOL_FULL_BYTES:
            return ""
        unbacked = size - self.backend.allocated_bytes(volume_id)
        if unbacked <= 0:
            return ""
        return (
            f"the pool is full ({usage.free_bytes} bytes free): writes into the {unbacked} "
            "not yet allocated bytes of this volume fail until space is freed"
        )
