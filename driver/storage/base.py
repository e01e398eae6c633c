"""The contract every storage backend fulfils. The image pool is the reference implementation."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from driver.model import FsType, PoolUsage, TrashItem
from driver.records import ImageRecord


class VolumeBackend(Protocol):
    """Byte storage for volumes and snapshots, addressed by validated IDs.

    Every method is idempotent where that makes sense (creating what exists with the same size,
    deleting what is gone) and atomic: a crash leaves either the old state or the new one, plus
    at most a temporary file that `leftovers()` reports.
    """

    root: str  # the pool directory, resolved; kubelet paths must stay clear of it
    pool_uuid: str  # the pool's identity ("" for a pool opened without one)

    @property
    def reflink(self) -> bool:
        """True when snapshots and clones share extents (O(extents) instead of O(size))."""
        ...

    def image_path(self, volume_id: str) -> str: ...

    def owns(self, path: str) -> bool:
        """True when `path` is a volume image of this pool (live or deleted)."""
        ...

    def snapshot_path(self, snapshot_id: str) -> str: ...

    # Every method that makes an image takes its `record`, which is durable with the image
    # before the method returns (so before the caller commits the row).
    def create(
        self,
        volume_id: str,
        size: int,
        *,
        preallocate: bool = False,
        record: ImageRecord | None = None,
    ) -> None: ...

    def clone_volume(
        self, source_id: str, volume_id: str, size: int, *, record: ImageRecord | None = None
    ) -> None: ...

    def restore_snapshot(
        self, snapshot_id: str, volume_id: str, size: int, *, record: ImageRecord | None = None
    ) -> None: ...

    def snapshot(
        self, volume_id: str, snapshot_id: str, *, record: ImageRecord | None = None
    ) -> None: ...

    def restore_path(self, volume_id: str) -> str:
        """Where a restore from an off-node backup builds the image of `volume_id`."""
        ...

    def adopt_restored(
        self, volume_id: str, size: int, *, record: ImageRecord | None
    ) -> None: ...

    def discard_restore(self, volume_id: str) -> None: ...

    def rescue_image(self, volume_id: str, device: str, record: ImageRecord | None) -> None:
        """Write a deleted image again from the loop device that still holds it."""
        ...

    def read_record(self, object_id: str) -> ImageRecord | None:
        """The image's own record, None when it has none; RecordError when unreadable."""
        ...

    def write_record(self, record: ImageRecord) -> None: ...

    def amend_record(
        self,
        object_id: str,
        *,
        size: int | None = None,
        formatted: bool | None = None,
        fs_type: FsType | None = None,  # None: unchanged
        mutable_parameters: dict[str, str] | None = None,
    ) -> None: ...

    def expand(self, volume_id: str, size: int) -> None: ...

    def volume_size(self, volume_id: str) -> int | None: ...

    def snapshot_exists(self, snapshot_id: str) -> bool: ...

    def delete_volume(self, volume_id: str) -> None: ...

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    def volume_ids(self) -> set[str]: ...

    def snapshot_ids(self) -> set[str]: ...

    def trash_orphan(self, kind: str, object_id: str) -> str: ...

    def trash_leftover(self, path: str) -> str: ...

    def empty_trash(self, older_than: float, claimed: Collection[str] = ()) -> int:
        """Reclaim old trash, never an item a row (`claimed`) or its own record claims."""
        ...

    def claimed_in_trash(self, claimed: Collection[str] = ()) -> list[str]: ...

    def trash(self) -> list[TrashItem]: ...

    def leftovers(self) -> list[str]:
        """Temporary files of interrupted copies (reconciliation moves them to trash)."""
        ...

    def allocated_bytes(self, object_id: str) -> int:
        """Bytes a volume's or snapshot's image occupies in the pool (less than its size when
        sparse; shared reflinked extents count for each image)."""
        ...

    def usage(self) -> PoolUsage: ...

    def healthy(self) -> bool: ...
