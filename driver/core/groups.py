"""Group snapshots (CSI GroupController): snapshots of several volumes of this node's pool taken
at one point in time, recorded as a whole or not at all.

Create: every member volume that is staged here as a filesystem is frozen (FIFREEZE), all of them
before the first copy and thawed only after the last (thaw in `finally`, and start-up
reconciliation thaws what a killed process left frozen, as for single snapshots); each image is
reflinked into a snapshot image that carries its own record. A journal entry naming the member
snapshot IDs is durable before the first image is made, and the rows of the group and of every
member are committed in one transaction that also closes the entry. A crash before that commit
leaves an open entry: start-up reconciliation deletes the images it names (they have no rows)
before it adopts record-carrying images, so the group is either wholly there or not at all; the
CO's retry then makes it anew. Delete: the rows go in one transaction that opens an entry naming
the images still to unlink; start-up finishes an interrupted delete.

A member snapshot is deleted only with its group (DeleteSnapshot answers FAILED_PRECONDITION).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

from driver import faults, ids, validation
from driver.core.controller import ControllerCore
from driver.core.pool import PoolContext
from driver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from driver.model import GroupSnapshot, Snapshot
from driver.records import ImageRecord

log = logging.getLogger(__name__)

CREATE_OP = "create-group"
DELETE_OP = "delete-group"
# What csi-snapshotter adds with --extra-create-metadata: accepted and ignored.
_GROUP_METADATA = frozenset(
    {
        "csi.storage.k8s.io/volumegroupsnapshot/name",
        "csi.storage.k8s.io/volumegroupsnapshot/namespace",
        "csi.storage.k8s.io/volumegroupsnapshotcontent/name",
    }
)


class GroupCore:
    def __init__(self, controller: ControllerCore) -> None:
        self.controller = controller
        self.ctx = controller.ctx

    def create(
        self, name: str, volume_ids: Sequence[str], parameters: Mapping[str, str]
    ) -> GroupSnapshot:
        validation.check_string("name", name)
        if not volume_ids:
            raise InvalidArgument("source_volume_ids is required")
        dups = sorted({v for v in volume_ids if volume_ids.count(v) > 1})
        if dups:
            raise InvalidArgument(f"source_volume_ids names {', '.join(dups)} more than once")
        for vid in volume_ids:
            validation.require_volume_id(vid, "source_volume_ids")
        unknown = sorted(set(parameters) - _GROUP_METADATA)
        if unknown:
            raise InvalidArgument(
                f"group snapshot parameters are not supported: {', '.join(unknown)}"
            )
        self.ctx.require_healthy()
        with self.ctx.locks.hold("group-name:" + name):
            existing = self.ctx.store.group_by_name(name)
            if existing is not None:
                if sorted(s.source_volume_id for s in existing.snapshots) != sorted(volume_ids):
                    raise AlreadyExists(
                        f"a group snapshot named {name!r} already exists with other volumes"
                    )
                return existing
            with self.ctx.locks.hold(*volume_ids):
                return self._create(name, volume_ids)

    def _create(self, name: str, volume_ids: Sequence[str]) -> GroupSnapshot:
        store, backend = self.ctx.store, self.ctx.backend
        vols = {vid: store.get_volume(vid) for vid in volume_ids}
        missing = sorted(vid for vid, v in vols.items() if v is None)
        if missing and len(missing) == len(volume_ids):
            raise NotFound(
                f"volumes {', '.join(missing)} do not exist in the pool of node {self.ctx.node_id}"
            )
        if missing:
            # A node sees only its own pool: a volume it does not hold is on another node or
            # nowhere. Either way these volumes cannot be frozen and copied together here.
            raise FailedPrecondition(
                f"volumes {', '.join(missing)} are not in the pool of node {self.ctx.node_id}, "
                "where the other members are: a group snapshot takes volumes of one node"
            )
        self.controller.require_copy_room(*volume_ids)
        gid, now = ids.new_group_snapshot_id(), time.time()
        snaps: list[Snapshot] = []
        for vid in volume_ids:
            vol = vols[vid]
            assert vol is not None
            snaps.append(
                Snapshot(
                    id=ids.new_snapshot_id(),
                    name=f"{gid}/{vid}",
                    source_volume_id=vid,
                    size=vol.size,
                    fs_type=vol.fs_type,
                    access_type=vol.access_type,
                    formatted=vol.formatted,
                    created_at=now,
                    sector_size=vol.sector_size,
                    group_id=gid,
                )
            )
        group = GroupSnapshot(gid, name, now, tuple(snaps))
        faults.hit("create-group:checked")
        seq = store.journal_begin(CREATE_OP, gid, {"snapshots": [s.id for s in snaps]})
        faults.hit("create-group:journaled")
        made: list[str] = []
        try:
            with contextlib.ExitStack() as frozen:
                for vid in sorted(volume_ids):  # one order: never two groups freezing crosswise
                    frozen.enter_context(self.controller.quiesced(vid, CREATE_OP))
                for snap in snaps:
                    backend.snapshot(
                        snap.source_volume_id,
                        snap.id,
                        record=ImageRecord.of_snapshot(snap, self.ctx.pool_uuid, name),
                    )
                    made.append(snap.id)
            faults.hit("create-group:images-ready")
            store.add_group(group, seq)
        except BaseException:
            self._undo(made, seq)
            raise
        faults.hit("create-group:recorded")
        log.info(
            "created group snapshot %s (%s) of %s as %s",
            gid,
            ", ".join(s.id for s in snaps),
            ", ".join(volume_ids),
            name,
        )
        return group

    def _undo(self, made: list[str], seq: int) -> None:
        """A create that failed (not crashed) removes the images it made and closes its entry.
        If that fails too, the entry stays open and the next start-up does the same."""
        try:
            for sid in made:
                self.ctx.backend.delete_snapshot(sid)
            self.ctx.store.journal_end(seq)
        except Exception:
            log.exception("could not undo the failed group snapshot; start-up will")

    @staticmethod
    def _check_members(group: GroupSnapshot, snapshot_ids: Sequence[str]) -> None:
        """An empty list asserts nothing; a list that is not the group's members is refused."""
        if snapshot_ids and sorted(snapshot_ids) != sorted(s.id for s in group.snapshots):
            raise InvalidArgument(
                f"snapshot_ids do not match the snapshots of group snapshot {group.id} "
                f"({', '.join(s.id for s in group.snapshots)})"
            )

    def get(self, group_id: str, snapshot_ids: Sequence[str]) -> GroupSnapshot:
        if not group_id:
            raise InvalidArgument("group_snapshot_id is required")
        group = self.ctx.store.group(group_id) if ids.is_group_snapshot_id(group_id) else None
        if group is None:
            raise NotFound(f"group snapshot {group_id[:64]!r} does not exist")
        self._check_members(group, snapshot_ids)
        return group

    def delete(self, group_id: str, snapshot_ids: Sequence[str]) -> None:
        if not group_id:
            raise InvalidArgument("group_snapshot_id is required")
        if not ids.is_group_snapshot_id(group_id):
            return  # not ours and never was
        self.ctx.require_healthy()
        with self.ctx.locks.hold(group_id):
            group = self.ctx.store.group(group_id)
            if group is None:
                return
            self._check_members(group, snapshot_ids)
            members = [s.id for s in group.snapshots]
            with self.ctx.locks.hold(*members):
                faults.hit("delete-group:checked")
                seq = self.ctx.store.remove_group(group, DELETE_OP, {"snapshots": members})
                faults.hit("delete-group:unrecorded")
                for sid in members:
                    self.ctx.backend.delete_snapshot(sid)
                faults.hit("delete-group:images-gone")
                self.ctx.store.journal_end(seq)
        log.info("deleted group snapshot %s (%s) and %s", group_id, group.name, ", ".join(members))



def end_interrupted(ctx: PoolContext, op: str, payload: Mapping[str, object]) -> list[str]:
    """Start-up: finish a group operation a crash interrupted (its journal entry is open). An
    unfinished create is undone, an unfinished delete is completed: either way the images its
    entry names that have no row are removed. Returns the snapshot IDs whose images went."""
    if op not in (CREATE_OP, DELETE_OP):
        return []
    named = payload.get("snapshots")
    removed = []
    for sid in named if isinstance(named, list) else []:
        if not isinstance(sid, str) or not ids.is_local_snapshot_id(sid):
            continue
        if ctx.store.get_snapshot(sid) is None and ctx.backend.snapshot_exists(sid):
            ctx.backend.delete_snapshot(sid)
            removed.append(sid)
    return removed
