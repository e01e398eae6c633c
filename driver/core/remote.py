"""Backup snapshots without a pool: the node-independent work controller mode serves when it is
given the backup targets and key (docs/design.md, "Who handles which snapshot").

A backup snapshot's ID names its target (`b-<target>-<32 hex>`) and its manifest
(`manifests/<ID>` in that target), so deleting it or describing it needs the object store and
nothing of the node that took it. The chart's controller Deployment runs a csi-snapshotter that
serves only the VolumeSnapshotContents labelled with the controller's identity: backup contents
whose node is gone and pre-provisioned contents imported from another cluster. Taking a snapshot
needs the volume, so CreateSnapshot is refused here; it is the volume's node's work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from driver import ids, validation
from driver.backup import Repository
from driver.core.backups import delete_manifest, open_repositories, origin_of
from driver.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from driver.model import Page, Snapshot

log = logging.getLogger(__name__)


class RemoteBackups:
    def __init__(self, repos: Mapping[str, Repository], cluster_id: str) -> None:
        self.repos = dict(repos)
        self.cluster_id = cluster_id

    @classmethod
    def open(
        cls, specs: Sequence[str], key_file: str, *, cluster_id: str, workers: int = 4
    ) -> RemoteBackups:
        return cls(
            open_repositories(specs, key_file, cluster_id=cluster_id, workers=workers),
            cluster_id,
        )

    def _repo(self, snapshot_id: str) -> Repository | None:
        target = ids.backup_target(snapshot_id)
        return self.repos.get(target) if target else None

    def create_snapshot(self, name: str, source_volume_id: str) -> Snapshot:
        validation.present(name=name, source_volume_id=source_volume_id)
        raise FailedPrecondition(
            f"snapshot {name!r} of volume {source_volume_id}: snapshots are taken by the node "
            "that holds the volume (its node-deployed csi-snapshotter), not by controller mode"
        )

    def delete_snapshot(self, snapshot_id: str) -> None:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not ids.is_backup_snapshot_id(snapshot_id):
            # A local snapshot lived only on its node's pool; with that node gone there is
            # nothing left to delete anywhere, which is success for the CO.
            if ids.is_snapshot_id(snapshot_id):
                log.info("DeleteSnapshot %s: a node-local snapshot; nothing to delete here",
                         snapshot_id)
            return
        delete_manifest(self._repo(snapshot_id), snapshot_id, self.cluster_id)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        validation.require_snapshot_id(snapshot_id)
        repo = self._repo(snapshot_id)
        if repo is None:
            raise NotFound(
                f"snapshot {snapshot_id} is not a backup on a target configured here "
                f"(configured: {', '.join(sorted(self.repos)) or 'none'})"
            )
        return origin_of(repo.show(snapshot_id))

    def list_snapshots(
        self, max_entries: int, token: str, snapshot_id: str, source_volume_id: str
    ) -> Page[Snapshot]:
        """By ID (what the csi-snapshotter asks for a pre-provisioned content), or every
        manifest of every configured target, in ID order, paged by the last ID returned."""
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        if token and not ids.is_backup_snapshot_id(token):
            raise Aborted(f"starting_token {token[:64]!r} is not a token this driver issued")
        if snapshot_id:
            try:
                snap = self.get_snapshot(snapshot_id)
            except (NotFound, InvalidArgument):
                return Page([], "")
            if source_volume_id and snap.source_volume_id != source_volume_id:
                return Page([], "")
            return Page([snap], "")
        found = sorted(
            info.snapshot_id
            for repo in self.repos.values()
            for info in repo.list()
            if info.snapshot_id > token
        )
        items: list[Snapshot] = []
        for sid in found:
            try:
                snap = self.get_snapshot(sid)
            except NotFound:
                continue  # deleted since the listing
            if source_volume_id and snap.source_volume_id != source_volume_id:
                continue
            items.append(snap)
            if max_entries and len(items) > max_entries:
                break
        more = bool(max_entries) and len(items) > max_entries
        items = items[:max_entries] if max_entries else items
        return Page(items, items[-1].id if more else "")
