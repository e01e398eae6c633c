"""The CSI SnapshotMetadata service (changed-block tracking): which byte ranges of a snapshot
hold data, and which differ between two snapshots of one volume.

Answered from the FIEMAP extent maps of the snapshot images by `driver.backup.extents`, the same
module incremental backups use: O(extents), no data is read. A snapshot is a reflink copy of its
volume's image, so two snapshots of one volume share every extent that was not written between
them; `extents.changed` reports the ranges whose extents differ (a superset of the bytes that
differ, never a subset). On a pool that cannot share extents (no reflink: each snapshot is a full
copy) nothing can be proven unchanged, so GetMetadataDelta answers FAILED_PRECONDITION, the
spec's "changed block tracking is not enabled"; GetMetadataAllocated works on any pool.

Validation and the extent maps are done before the first message is streamed, so every error has
its code before any data; the ranges are then cut into messages of at most `max_results`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from driver import ids
from driver.backup import extents
from driver.backup.extents import Range
from driver.core.pool import PoolContext
from driver.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from driver.model import Snapshot

#: Ranges per message when the caller leaves max_results at 0.
DEFAULT_MAX_RESULTS = 256


@dataclass(frozen=True)
class Answer:
    capacity: int  # the snapshot's size: volume_capacity_bytes of every message
    pages: Iterator[list[Range]]  # at least one page, possibly empty


def _pages(ranges: list[Range], offset: int, max_results: int) -> Iterator[list[Range]]:
    """The ranges from `offset` on (the first one cut there), `max_results` per page."""
    page: list[Range] = []
    sent = False
    for r in ranges:
        if r.end <= offset:
            continue
        page.append(Range(offset, r.end - offset) if r.offset < offset else r)
        if len(page) == max_results:
            yield page
            page, sent = [], True
    if page or not sent:
        yield page


class MetadataCore:
    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx

    @staticmethod
    def _check(starting_offset: int, max_results: int) -> int:
        if starting_offset < 0:
            raise InvalidArgument("starting_offset must not be negative")
        if max_results < 0:
            raise InvalidArgument("max_results must not be negative")
        return max_results or DEFAULT_MAX_RESULTS

    def _snapshot(self, snapshot_id: str, what: str) -> Snapshot:
        if not snapshot_id:
            raise InvalidArgument(f"{what} is required")
        snap = self.ctx.store.get_snapshot(snapshot_id) if ids.is_snapshot_id(snapshot_id) else None
        if snap is None or not self.ctx.backend.snapshot_exists(snapshot_id):
            raise NotFound(f"{what} {snapshot_id[:80]!r} does not exist on node {self.ctx.node_id}")
        return snap

    @staticmethod
    def _within(snap: Snapshot, starting_offset: int) -> None:
        if starting_offset >= snap.size:
            raise OutOfRange(
                f"starting_offset {starting_offset} is not below the size of snapshot {snap.id} "
                f"({snap.size} bytes)"
            )

    def allocated(self, snapshot_id: str, starting_offset: int, max_results: int) -> Answer:
        """GetMetadataAllocated: the ranges of the snapshot that hold data."""
        limit = self._check(starting_offset, max_results)
        snap = self._snapshot(snapshot_id, "snapshot_id")
        self._within(snap, starting_offset)
        ranges = extents.allocated(self.ctx.backend.snapshot_path(snap.id))
        return Answer(snap.size, _pages(_clip(ranges, snap.size), starting_offset, limit))

    def delta(
        self, base_id: str, target_id: str, starting_offset: int, max_results: int
    ) -> Answer:
        """GetMetadataDelta: the ranges of the target that may differ from the base."""
        limit = self._check(starting_offset, max_results)
        base = self._snapshot(base_id, "base_snapshot_id")
        target = self._snapshot(target_id, "target_snapshot_id")
        if base.source_volume_id != target.source_volume_id:
            raise InvalidArgument(
                f"base snapshot {base.id} is of volume {base.source_volume_id}, target "
                f"{target.id} of volume {target.source_volume_id}: a delta compares two "
                "snapshots of one volume"
            )
        self._within(target, starting_offset)
        if not self.ctx.backend.reflink:
            raise FailedPrecondition(
                f"changed block tracking is not available on node {self.ctx.node_id}: its pool "
                "cannot share extents (snapshots are full copies); back up the whole snapshot "
                "(GetMetadataAllocated) instead"
            )
        backend = self.ctx.backend
        ranges = extents.changed(backend.snapshot_path(base.id), backend.snapshot_path(target.id))
        return Answer(target.size, _pages(_clip(ranges, target.size), starting_offset, limit))


def _clip(ranges: list[Range], size: int) -> list[Range]:
    """Ranges cut at `size` (an image may be longer than its recorded size, never shorter)."""
    return [Range(r.offset, min(r.end, size) - r.offset) for r in ranges if r.offset < size]
