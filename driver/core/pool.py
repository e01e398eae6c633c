"""Everything a core service needs to act on the local pool, built once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass

from driver.backends.base import VolumeBackend
from driver.errors import Unavailable
from driver.exec import Runner
from driver.locks import KeyedLocks
from driver.mount.fs import Filesystems
from driver.mount.loop import LoopManager
from driver.mount.mounter import Mounter
from driver.state import Store


@dataclass
class PoolContext:
    node_id: str
    store: Store
    backend: VolumeBackend
    locks: KeyedLocks
    loops: LoopManager
    mounter: Mounter
    fs: Filesystems
    runner: Runner
    max_volumes_per_node: int = 0
    loop_sector_size: int = 4096

    def require_healthy(self) -> None:
        if not self.backend.healthy() or not self.store.healthy():
            raise Unavailable("the storage pool or its metadata store is unusable on this node")

    def loop_rdev(self, device: str) -> int:
        return os.stat(device).st_rdev
