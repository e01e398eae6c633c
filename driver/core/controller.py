"""Controller operations: volumes, snapshots and capacity on the local pool, and the expansion
answer that needs no pool at all (`expand_request`, served in every mode)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from driver import TOPOLOGY_KEY, faults, ids, validation
from driver.core import sizing
from driver.core.backups import Backups, origin_of, rebuild_error
from driver.core.pool import PoolContext
from driver.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from driver.model import (
    DEFAULT_FS_TYPE,
    AccessType,
    BackupPhase,
    Capability,
    CapacityRange,
    Condition,
    ContentSource,
    FsType,
    Page,
    PendingRestore,
    Snapshot,
    Volume,
)
from driver.records import ImageRecord

log = logging.getLogger(__name__)

Segment = Mapping[str, str]

BACKUP_TARGET_PARAMETER = "stowage.csi.io/backup-target"
KEEP_LOCAL_PARAMETER = "stowage.csi.io/backup-keep-local"
# What the external-snapshotter adds with --extra-create-metadata: accepted and ignored.
_SNAPSHOT_METADATA = frozenset(
    {
        "csi.storage.k8s.io/volumesnapshot/name",
        "csi.storage.k8s.io/volumesnapshot/namespace",
        "csi.storage.k8s.io/volumesnapshotcontent/name",
    }
)
#: A CreateVolume from an off-node backup waits this long for the download before answering
#: ABORTED ("in progress"); the download continues and the CO's retry picks it up.
RESTORE_WAIT = 5.0


@dataclass(frozen=True)
class VolumeStatus:
    volume: Volume
    condition: Condition


class ControllerCore:
    def __init__(
        self, ctx: PoolContext, backups: Backups | None = None, cluster_id: str = "default"
    ) -> None:
        self.ctx = ctx
        self.backups = backups
        self.cluster_id = cluster_id

    # --- topology -----------------------------------------------------------------------------
    @property
    def segment(self) -> dict[str, str]:
        return {TOPOLOGY_KEY: self.ctx.node_id}

    def _reachable(self, segments: Sequence[Segment]) -> bool:
        """True when one of `segments` names this node (segments with other keys never do)."""
        return any(dict(s) == self.segment for s in segments)

    # --- volumes ------------------------------------------------------------------------------
    def create_volume(
        self,
        name: str,
        caps: Sequence[Capability],
        rng: CapacityRange,
        parameters: Mapping[str, str],
        source: ContentSource | None,
        requisite: Sequence[Segment] = (),
        preferred: Sequence[Segment] = (),
        mutable: Mapping[str, str] | None = None,
    ) -> Volume:
        """`mutable` holds the mutable parameters (I/O limits) of the claim's
        VolumeAttributesClass, kept with the volume (driver.core.modify)."""
        validation.check_string("name", name)
        validation.check_capabilities(caps)
        validation.check_parameters(parameters)
        mutable_parameters = validation.merge_mutable_parameters({}, mutable or {})
        access, fs_type = validation.fs_type_for(caps, parameters)
        if (requisite or preferred) and not self._reachable([*requisite, *preferred]):
            raise ResourceExhausted(
                f"this driver can only provision on node {self.ctx.node_id}, which the "
                "accessibility requirements do not include"
            )
        self.ctx.require_healthy()
        keys = ["name:" + name]
        if source:
            keys.append(source.id)
        with self.ctx.locks.hold(*keys):
            existing = self.ctx.store.volume_by_name(name)
            if existing is not None:
                return self._same_volume(existing, rng, access, fs_type, source)
            pending = self.ctx.store.pending_restore(name)
            if pending is not None and (source is None or pending.snapshot_id != source.id):
                raise AlreadyExists(
                    f"a volume named {name!r} is being restored from {pending.snapshot_id}"
                )
            floor = 0
            formatted = False
            origin: Volume | Snapshot | None = None
            remote: Snapshot | None = None  # an off-node backup without a local copy here
            if source is not None:
                origin = self._source(source)
                if isinstance(origin, Snapshot) and ids.is_backup_snapshot_id(origin.id) and not (
                    self.ctx.backend.snapshot_exists(origin.id)
                ):
                    remote = origin
                if origin.access_type is not access:
                    raise InvalidArgument(
                        f"source {source.id} is a {origin.access_type.value} volume; "
                        f"cannot make a {access.value} volume from it"
                    )
                if origin.formatted:
                    explicit = {c.fs_type for c in caps if c.fs_type}
                    if explicit and explicit != {origin.fs_type}:
                        raise InvalidArgument(
                            f"source {source.id} holds {origin.fs_type}; "
                            f"requested {sorted(explicit)}"
                        )
                    fs_type = origin.fs_type
                floor = origin.size
                formatted = origin.formatted
            size = sizing.resolve_size(rng, fs_type, floor)
            # A filesystem made on one sector size may not mount on another: a clone or restore
            # keeps its origin's, a new volume takes the node's current setting.
            sector_size = origin.sector_size if origin is not None else self.ctx.loop_sector_size
            if remote is not None:
                pass  # thin: a pool that fills up while restoring answers RESOURCE_EXHAUSTED
            elif source is not None:
                self.require_copy_room(source.id)
            elif size > (free := self.ctx.backend.usage().available_bytes):
                raise ResourceExhausted(
                    f"the pool on {self.ctx.node_id} has {free} bytes free; "
                    f"a volume of {size} bytes does not fit"
                )
            vol = Volume(
                id=pending.volume_id if pending is not None else ids.new_volume_id(),
                name=name,
                size=size,
                access_type=access,
                fs_type=fs_type,
                formatted=formatted,
                source=source,
                parameters=dict(parameters),
                created_at=time.time(),
                sector_size=sector_size,
                mutable_parameters=mutable_parameters,
            )
            op = {None: "create-volume", "snapshot": "restore-volume", "volume": "clone-volume"}[
                source.kind if source else None
            ]
            faults.hit(op + ":checked")
            if remote is not None:
                return self._restore_backup(vol, remote.id, pending)
            # The image carries its own record, durable before the row is committed.
            record = ImageRecord.of_volume(vol, self.ctx.pool_uuid)
            if source is None:
                self.ctx.backend.create(
                    vol.id, size, preallocate=parameters.get("preallocate") == "true", record=record
                )
            elif source.kind == "snapshot":
                self.ctx.backend.restore_snapshot(source.id, vol.id, size, record=record)
            else:
                with self.quiesced(source.id, op):
                    self.ctx.backend.clone_volume(source.id, vol.id, size, record=record)
            faults.hit(op + ":image-ready")
            self.ctx.store.add_volume(vol)
            faults.hit(op + ":recorded")
            log.info("created volume %s (%s, %d bytes) as %s", vol.id, access.value, size, name)
            return vol

    def require_copy_room(self, *origin_ids: str) -> None:
        """A reflink copy costs nothing now, but each block later rewritten in either copy needs
        a new one (and a full copy needs them at once). Refuse copies the pool could not absorb
        having all of their origins' data rewritten: otherwise a snapshot on a nearly full pool
        turns the origin's next overwrites into write errors."""
        need = sum(self.ctx.backend.allocated_bytes(i) for i in origin_ids)
        free = self.ctx.backend.usage().available_bytes
        if need > free:
            raise ResourceExhausted(
                f"{', '.join(origin_ids)} hold {need} bytes of data; the pool on "
                f"{self.ctx.node_id} has {free} bytes free, too little to keep a copy writable"
            )

    def _restore_backup(
        self, vol: Volume, snapshot_id: str, pending: PendingRestore | None
    ) -> Volume:
        """Download an off-node backup into a new volume: in the background, resumable, the
        volume recorded only once every chunk is verified and its image is in the pool."""
        assert self.backups is not None
        if pending is None:
            self.ctx.store.add_pending_restore(
                PendingRestore(vol.name, vol.id, snapshot_id, time.time())
            )

        def finish() -> None:
            if self.ctx.store.get_volume(vol.id) is not None:
                return
            self.ctx.backend.adopt_restored(
                vol.id, vol.size, record=ImageRecord.of_volume(vol, self.ctx.pool_uuid)
            )
            self.ctx.store.add_volume(vol, finishes_restore=True)
            log.info("restored volume %s (%d bytes) from backup %s as %s", vol.id, vol.size,
                     snapshot_id, vol.name)

        self.backups.restore(vol.id, snapshot_id, finish, RESTORE_WAIT)
        return vol

    def _source(self, source: ContentSource) -> Volume | Snapshot:
        if source.kind == "snapshot":
            validation.require_snapshot_id(source.id, "volume_content_source.snapshot.snapshot_id")
            snap = self.ctx.store.get_snapshot(source.id)
            if snap is None and ids.is_backup_snapshot_id(source.id) and self.backups:
                # Not taken here (another node, another cluster): its manifest describes it.
                return origin_of(self.backups.manifest(source.id))
            if snap is None:
                raise NotFound(f"source snapshot {source.id} does not exist")
            return snap
        validation.require_volume_id(source.id, "volume_content_source.volume.volume_id")
        vol = self.ctx.store.get_volume(source.id)
        if vol is None:
            raise NotFound(f"source volume {source.id} does not exist")
        return vol

    @staticmethod
    def _same_volume(
        existing: Volume,
        rng: CapacityRange,
        access: AccessType,
        fs_type: FsType | None,
        source: ContentSource | None,
    ) -> Volume:
        """A retried CreateVolume gets the volume it made; anything incompatible is refused."""
        problems = []
        if existing.size < rng.required or (rng.limit and existing.size > rng.limit):
            problems.append(f"its size is {existing.size} bytes")
        if existing.access_type is not access:
            problems.append(f"it is a {existing.access_type.value} volume")
        if access is AccessType.MOUNT and existing.source is None and existing.fs_type != fs_type:
            problems.append(f"it uses {existing.fs_type}")
        if existing.source != source:
            problems.append("it has a different content source")
        if problems:
            raise AlreadyExists(
                f"a volume named {existing.name!r} already exists and is incompatible: "
                + "; ".join(problems)
            )
        return existing

    @contextlib.contextmanager
    def quiesced(self, volume_id: str, op: str, trim: bool = False) -> Iterator[None]:
        """Freeze the volume's filesystem while its image is copied, if it is mounted here.
        With `trim`, its free space is discarded first (fstrim): deleted files become holes in
        the image and are not carried into a backup."""
        staging = self.ctx.store.staging(volume_id)
        if staging is None or staging.access_type is not AccessType.MOUNT:
            yield
            return
        if not self.ctx.mounter.is_mounted(staging.path):
            yield
            return
        if trim:
            try:
                trimmed = self.ctx.fs.trim(staging.path)
            except Internal as exc:  # an optimisation: the snapshot goes on without it
                log.warning("%s: %s; deleted files may be carried into the backup", op, exc)
            else:
                log.info("trimmed %s before its snapshot: %s", volume_id,
                         "not supported" if trimmed is None else f"{trimmed} bytes")
        with self.ctx.fs.frozen(staging.path):
            faults.hit(op + ":frozen")
            yield

    def delete_volume(self, volume_id: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not ids.is_volume_id(volume_id):
            return  # not ours and never was: nothing to delete
        self.ctx.require_healthy()
        with self.ctx.locks.hold(volume_id):
            vol = self.ctx.store.get_volume(volume_id)
            if vol is None:
                return
            if self.ctx.store.in_use(volume_id):
                raise FailedPrecondition(
                    f"volume {volume_id} is still staged or published on {self.ctx.node_id}"
                )
            faults.hit("delete-volume:checked")
            self.ctx.store.remove_volume(volume_id)
            faults.hit("delete-volume:unrecorded")
            self.ctx.backend.delete_volume(volume_id)
            faults.hit("delete-volume:image-gone")
            log.info("deleted volume %s (%s)", volume_id, vol.name)

    def _volume(self, volume_id: str) -> Volume:
        vol = self.ctx.store.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return vol

    def condition(self, vol: Volume) -> Condition:
        size = self.ctx.backend.volume_size(vol.id)
        if size is None:
            return Condition(True, f"the image of {vol.id} is missing from the pool")
        if size < vol.size:
            return Condition(True, f"the image is {size} bytes, smaller than recorded {vol.size}")
        if starved := self.ctx.starved(vol.id, vol.size):
            return Condition(True, starved)
        return Condition(False, "healthy")

    def volume_status(self, volume_id: str) -> VolumeStatus:
        validation.require_volume_id(volume_id)
        vol = self._volume(volume_id)
        return self._status(vol)

    def _status(self, vol: Volume) -> VolumeStatus:
        return VolumeStatus(vol, self.condition(vol))

    def list_volumes(self, max_entries: int, token: str) -> Page[VolumeStatus]:
        after = self._token(max_entries, token, ids.is_volume_id)
        rows = self.ctx.store.list_volumes(after, max_entries + 1 if max_entries else 0)
        more = bool(max_entries) and len(rows) > max_entries
        rows = rows[:max_entries] if max_entries else rows
        return Page([self._status(v) for v in rows], rows[-1].id if more else "")

    @staticmethod
    def _token(max_entries: int, token: str, valid: Callable[[str], bool]) -> str:
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        if token and not valid(token):
            raise Aborted(f"starting_token {token[:64]!r} is not a token this driver issued")
        return token

    def validate_capabilities(
        self, volume_id: str, caps: Sequence[Capability], parameters: Mapping[str, str]
    ) -> str:
        """Empty string when every capability is supported for the volume, else the reason."""
        if not caps:  # a request without capabilities is malformed whatever the ID
            raise InvalidArgument("volume_capabilities is required")
        validation.require_volume_id(volume_id)
        vol = self._volume(volume_id)
        return validation.unsupported_capability(
            volume_id, caps, vol.access_type, vol.fs_type, vol.formatted
        )

    def capacity(self, caps: Sequence[Capability], segment: Segment | None) -> tuple[int, int]:
        """(available bytes, maximum volume size) for volumes with `caps` in `segment`."""
        if segment is not None and dict(segment) != self.segment:
            return 0, 0
        for cap in caps:
            try:
                validation.check_capability(cap)
            except InvalidArgument:
                return 0, 0
        self.ctx.require_healthy()
        available = self.ctx.backend.usage().available_bytes
        return available, available

    # --- snapshots ----------------------------------------------------------------------------
    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        validation.check_string("name", name)
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        target = self._backup_target(parameters)
        self.ctx.require_healthy()
        with self.ctx.locks.hold("snapshot-name:" + name):
            existing = self.ctx.store.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id != source_volume_id:
                    raise AlreadyExists(
                        f"a snapshot named {name!r} already exists for volume "
                        f"{existing.source_volume_id}"
                    )
                if (ids.backup_target(existing.id) or "") != target:
                    raise AlreadyExists(
                        f"a snapshot named {name!r} already exists with another "
                        f"{BACKUP_TARGET_PARAMETER} ({ids.backup_target(existing.id) or 'none'})"
                    )
                return self._upload_status(existing) if target else existing
            validation.require_volume_id(source_volume_id, "source_volume_id")
            with self.ctx.locks.hold(source_volume_id):
                vol = self._volume(source_volume_id)
                if target and vol.access_type is AccessType.MOUNT and not vol.formatted:
                    raise FailedPrecondition(
                        f"volume {vol.id} has never been staged: it holds no filesystem to "
                        "back up yet"
                    )
                self.require_copy_room(vol.id)
                snap = Snapshot(
                    id=ids.new_backup_snapshot_id(target) if target else ids.new_snapshot_id(),
                    name=name,
                    source_volume_id=vol.id,
                    size=vol.size,
                    fs_type=vol.fs_type,
                    access_type=vol.access_type,
                    formatted=vol.formatted,
                    created_at=time.time(),
                    sector_size=vol.sector_size,
                )
                faults.hit("create-snapshot:checked")
                with self.quiesced(vol.id, "create-snapshot", trim=bool(target)):
                    self.ctx.backend.snapshot(
                        vol.id, snap.id, record=ImageRecord.of_snapshot(snap, self.ctx.pool_uuid)
                    )
                faults.hit("create-snapshot:image-ready")
                self.ctx.store.add_snapshot(
                    snap,
                    backup_target=target,
                    keep_local=parameters.get(KEEP_LOCAL_PARAMETER) != "false",
                )
                faults.hit("create-snapshot:recorded")
                log.info("created snapshot %s of %s as %s", snap.id, vol.id, name)
                if target:
                    assert self.backups is not None
                    self.backups.start_upload(snap.id)
                    return dataclasses.replace(snap, ready=False)
                return snap

    def _backup_target(self, parameters: Mapping[str, str]) -> str:
        """The backup target a snapshot class names ("" for a local snapshot)."""
        known = {BACKUP_TARGET_PARAMETER, KEEP_LOCAL_PARAMETER}
        unknown = sorted(set(parameters) - _SNAPSHOT_METADATA - known)
        if unknown:
            raise InvalidArgument(
                f"snapshot parameters are not supported: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        keep = parameters.get(KEEP_LOCAL_PARAMETER)
        if keep is not None and (
            keep not in ("true", "false") or BACKUP_TARGET_PARAMETER not in parameters
        ):
            raise InvalidArgument(
                f'{KEEP_LOCAL_PARAMETER} is "true" or "false", with {BACKUP_TARGET_PARAMETER}'
            )
        target = parameters.get(BACKUP_TARGET_PARAMETER, "")
        if BACKUP_TARGET_PARAMETER in parameters and (
            self.backups is None or target not in self.backups.names()
        ):
            configured = ", ".join(self.backups.names()) if self.backups else ""
            raise InvalidArgument(
                f"{BACKUP_TARGET_PARAMETER} {target[:64]!r} is not a backup target of node "
                f"{self.ctx.node_id} (configured: {configured or 'none; see --backup-target'})"
            )
        return target

    def _upload_status(self, snap: Snapshot) -> Snapshot:
        """A retried CreateSnapshot of a backup snapshot: ready once its manifest is durable;
        the last upload failure is answered (with its code) and the upload starts again."""
        assert self.backups is not None
        st = self.ctx.store.backup(snap.id)
        if st is None:  # adopted from its image's record: upload state lost, start over
            self.ctx.store.ensure_backup(snap.id, ids.backup_target(snap.id) or "", snap.size)
        elif st.phase is BackupPhase.DONE:
            return snap
        elif st.phase is BackupPhase.FAILED:
            self.ctx.store.set_backup(snap.id, BackupPhase.PENDING)
            self.backups.start_upload(snap.id)
            raise rebuild_error(
                st.error_code,
                f"uploading snapshot {snap.id} to target {st.target} failed (retrying): "
                f"{st.error}",
            )
        self.backups.start_upload(snap.id)  # a no-op while it runs
        return dataclasses.replace(snap, ready=False)

    def delete_snapshot(self, snapshot_id: str) -> None:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not ids.is_snapshot_id(snapshot_id):
            return
        self.ctx.require_healthy()
        with self.ctx.locks.hold(snapshot_id):
            if ids.is_backup_snapshot_id(snapshot_id):
                # The manifest first: a failure leaves everything as it was, for the retry.
                if self.backups is not None:
                    self.backups.cancel_upload(snapshot_id)
                    self.backups.delete_remote(snapshot_id, self.cluster_id)
                else:
                    log.warning("DeleteSnapshot %s: no backup targets are configured on this "
                                "node; only a local copy is removed", snapshot_id)
            snap = self.ctx.store.get_snapshot(snapshot_id)
            if snap is None:
                return
            if snap.group_id:
                raise FailedPrecondition(
                    f"snapshot {snapshot_id} belongs to group snapshot {snap.group_id}; "
                    "DeleteVolumeGroupSnapshot deletes the group's snapshots together"
                )
            faults.hit("delete-snapshot:checked")
            self.ctx.store.remove_snapshot(snapshot_id)
            faults.hit("delete-snapshot:unrecorded")
            self.ctx.backend.delete_snapshot(snapshot_id)
            faults.hit("delete-snapshot:image-gone")
            log.info("deleted snapshot %s (%s)", snapshot_id, snap.name)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        validation.require_snapshot_id(snapshot_id)
        snap = self.ctx.store.get_snapshot(snapshot_id)
        if snap is None and ids.is_backup_snapshot_id(snapshot_id) and self.backups:
            return origin_of(self.backups.manifest(snapshot_id))  # taken elsewhere: imported
        if snap is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return snap

    def list_snapshots(
        self, max_entries: int, token: str, snapshot_id: str, source_volume_id: str
    ) -> Page[Snapshot]:
        after = self._token(max_entries, token, ids.is_snapshot_id)
        if snapshot_id:
            snap: Snapshot | None = None
            if ids.is_snapshot_id(snapshot_id):
                try:
                    snap = self.get_snapshot(snapshot_id)
                except NotFound:
                    snap = None
            if snap is None or (source_volume_id and snap.source_volume_id != source_volume_id):
                return Page([], "")
            return Page([snap], "")
        if source_volume_id and not ids.is_volume_id(source_volume_id):
            return Page([], "")
        rows = self.ctx.store.list_snapshots(
            after, max_entries + 1 if max_entries else 0, source_volume_id
        )
        more = bool(max_entries) and len(rows) > max_entries
        rows = rows[:max_entries] if max_entries else rows
        return Page(rows, rows[-1].id if more else "")


def expand_request(volume_id: str, rng: CapacityRange | None, cap: Capability | None) -> int:
    """ControllerExpandVolume, answered from the request alone, in every mode: the size the
    volume will have, rounded as CreateVolume rounds. The node grows the image, its loop device
    and the filesystem in NodeExpandVolume (`NodeCore.expand`), so the answer always comes with
    node_expansion_required.

    Nothing here reads the pool or the cluster, so controller mode (no pool) and `all` mode run
    the same code. A well-formed ID of a volume that does not exist gets an answer too; the CO
    then calls NodeExpandVolume, which looks and answers NOT_FOUND."""
    # A missing field is INVALID_ARGUMENT whatever the ID looks like; then the ID's format.
    validation.present(volume_id=volume_id, capacity_range=rng and (rng.required or rng.limit))
    validation.require_volume_id(volume_id)
    assert rng is not None
    fs_type: FsType | None = DEFAULT_FS_TYPE
    if cap is not None:
        validation.check_capability(cap)
        _, fs_type = validation.fs_type_for([cap], {})
    return sizing.resolve_size(rng, fs_type)
