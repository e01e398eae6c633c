"""Everything a core service needs to act on the local pool, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from driver.errors import FailedPrecondition, Unavailable
from driver.host.base import Host
from driver.host.fs import Filesystems
from driver.host.loop import LoopManager
from driver.host.mounter import Mounter
from driver.records import ImageRecord
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
    pool_uuid: str = ""  # the pool's identity (pool.json); "" for a pool opened without one

    def require_pool(self, named: str) -> None:
        """A volume whose context names another pool is not on this node's pool: the disk that
        held it is not the one mounted here (or the directory is a fresh pool)."""
        if named and self.pool_uuid and named != self.pool_uuid:
            raise FailedPrecondition(
                f"the volume belongs to pool {named}, but the pool on node {self.node_id} is "
                f"{self.pool_uuid}: is the right disk mounted at the pool directory? "
                "(see docs/operations.md)"
            )

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

    def deleted_image_loops(self, volume_id: str) -> list[str]:
        """Loop devices that still hold the deleted image of `volume_id` (the file was removed
        by hand while the volume was attached): until detached, its only copy of the data."""
        image = self.backend.image_path(volume_id)
        return [lo.device for lo in self.loops.devices() if lo.deleted and lo.backing_file == image]

    def rescue_deleted_image(self, volume_id: str) -> str:
        """If the image of a recorded volume is gone but a loop device still holds it, write it
        back from that device (which the caller has made quiescent). Returns the device, or ""
        when there was nothing to rescue."""
        if self.backend.volume_size(volume_id) is not None:
            return ""
        vol = self.store.get_volume(volume_id)
        devices = self.deleted_image_loops(volume_id)
        if vol is None or not devices:
            return ""
        self.backend.rescue_image(volume_id, devices[0], ImageRecord.of_volume(vol, self.pool_uuid))
        return devices[0]

    def loop_rdev(self, device: str) -> int | None:
        return self.host.rdev(device)
