"""Node-side operations: stage (loop + format-if-safe + mount), publish (bind), stats, expand."""

from __future__ import annotations

import logging
import os

from driver import faults, validation
from driver.core import sizing
from driver.core.modify import IoLimitsCore
from driver.core.pool import PoolContext
from driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    StowageError,
)
from driver.host import fs as host_fs
from driver.host import mountinfo
from driver.host.loop import LoopDevice
from driver.host.mounter import SAFE_DEFAULTS
from driver.model import (
    DEFAULT_FS_TYPE,
    AccessMode,
    AccessType,
    Capability,
    CapacityRange,
    Condition,
    FsType,
    Publication,
    Staging,
    Volume,
    VolumeStats,
)

log = logging.getLogger(__name__)

# A filesystem this much smaller than its device is grown at stage (offline expansion). Metadata
# keeps every filesystem a little smaller than its device, so "any difference" would be wrong.
_GROW_SLACK = 64 * 1024 * 1024


class NodeCore:
    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx
        self.limits = IoLimitsCore(ctx)

    # --- helpers ------------------------------------------------------------------------------
    def _path(self, field: str, value: str) -> str:
        """A staging or target path from kubelet: absolute, no '..', no symbolic link on the
        way, and clear of the pool (rule 6 of the design)."""
        path = validation.require_path(field, value)
        validation.require_outside(field, path, self.ctx.backend.root)
        self.ctx.mounter.refuse_symlinks(path)
        return path

    def _volume(self, volume_id: str) -> Volume:
        vol = self.ctx.store.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.ctx.node_id}")
        return vol

    def _check_access(self, vol: Volume, cap: Capability) -> None:
        if cap.access_type is not vol.access_type:
            raise FailedPrecondition(
                f"volume {vol.id} was created for {vol.access_type.value} access and cannot be "
                f"used as {cap.access_type.value} (that could format or expose raw data)"
            )
        if cap.fs_type and vol.formatted and cap.fs_type != vol.fs_type:
            raise FailedPrecondition(
                f"volume {vol.id} holds {vol.fs_type}; it cannot be mounted as {cap.fs_type}"
            )

    def _loop(self, vol: Volume) -> LoopDevice | None:
        found = self.ctx.loops.find(self.ctx.backend.image_path(vol.id))
        return found[0] if len(found) == 1 else None

    def _top(self, path: str) -> mountinfo.MountEntry | None:
        return mountinfo.top_mount_at(path, self.ctx.host.mounts())

    def _on(self, entry: mountinfo.MountEntry, device: str) -> bool:
        return mountinfo.is_on(entry, device, self.ctx.host.rdev(device))

    def _mounts_of(self, device: str) -> list[mountinfo.MountEntry]:
        return mountinfo.mounts_of(device, self.ctx.host.mounts(), self.ctx.host.rdev(device))

    def _carries(self, path: str, device: str) -> bool:
        """True when the top mount at `path` is the filesystem on `device`."""
        top = self._top(path)
        return top is not None and self._on(top, device)

    def _staged_ok(self, vol: Volume, staging: Staging) -> bool:
        loop = self._loop(vol)
        if loop is None or loop.device != staging.device:
            return False
        if staging.access_type is AccessType.BLOCK:
            return True
        return self._carries(staging.path, loop.device)

    # --- stage --------------------------------------------------------------------------------
    def stage(
        self, volume_id: str, staging_path: str, cap: Capability, pool_uuid: str = ""
    ) -> None:
        """`pool_uuid` is the pool the volume context names ("" for volumes made before pools
        had an identity)."""
        validation.require_volume_id(volume_id)
        staging_path = self._path("staging_target_path", staging_path)
        validation.check_capability(cap)
        self.ctx.require_healthy()
        self.ctx.require_pool(pool_uuid)
        with self.ctx.locks.hold(volume_id):
            self._stage(self._volume(volume_id), staging_path, cap)

    def _stage(self, vol: Volume, staging_path: str, cap: Capability) -> Staging:
        self._check_access(vol, cap)
        readonly = cap.access_mode.read_only
        flags = tuple(validation.check_mount_flags(cap.mount_flags))
        current = self.ctx.store.staging(vol.id)
        if current is not None:
            if current.path != staging_path:
                raise FailedPrecondition(
                    f"volume {vol.id} is already staged at {current.path} on this node"
                )
            if self._staged_ok(vol, current):
                if current.readonly != readonly or current.mount_flags != flags:
                    raise AlreadyExists(
                        f"volume {vol.id} is staged at {staging_path} with different options"
                    )
                return current
            log.warning("staging record of %s is stale (node restarted?); staging again", vol.id)
            self.ctx.store.remove_staging(vol.id)

        image = self.ctx.backend.image_path(vol.id)
        if self.ctx.backend.volume_size(vol.id) is None:
            raise FailedPrecondition(f"the image of volume {vol.id} is missing from the pool")
        had_loop = bool(self.ctx.loops.find(image))
        made_dir = False
        if vol.access_type is AccessType.MOUNT:
            made_dir = self.ctx.mounter.ensure_dir(staging_path)
        try:
            return self._attach_and_mount(vol, staging_path, cap, readonly, flags)
        except BaseException:
            # A refused or failed stage leaves nothing behind that it made: no loop device it
            # attached, no directory it created (only when nothing got mounted on either).
            if not had_loop:
                for lo in self.ctx.loops.find(image):
                    if not self._mounts_of(lo.device):
                        self.ctx.loops.detach(lo.device)
            if made_dir and not self.ctx.mounter.is_mounted(staging_path):
                self.ctx.mounter.remove_target(staging_path)
            raise

    def _attach_and_mount(
        self,
        vol: Volume,
        staging_path: str,
        cap: Capability,
        readonly: bool,
        flags: tuple[str, ...],
    ) -> Staging:
        image = self.ctx.backend.image_path(vol.id)
        loop = self.ctx.loops.attach(image, sector_size=vol.sector_size)
        faults.hit("stage:loop-attached")
        return self._stage_on(vol, staging_path, cap, loop.device, readonly, flags)

    def _stage_on(
        self,
        vol: Volume,
        staging_path: str,
        cap: Capability,
        device: str,
        readonly: bool,
        flags: tuple[str, ...],
    ) -> Staging:
        if vol.access_type is AccessType.BLOCK:
            staging = Staging(vol.id, staging_path, device, AccessType.BLOCK, None, readonly, ())
            self.ctx.store.put_staging(staging)
            return staging

        fs_type = vol.fs_type or FsType(cap.fs_type or DEFAULT_FS_TYPE)
        self._format_and_mount(vol, device, staging_path, fs_type, readonly, flags)
        staging = Staging(vol.id, staging_path, device, AccessType.MOUNT, fs_type, readonly, flags)
        self.ctx.store.put_staging(staging)
        log.info("staged %s (%s on %s) at %s", vol.id, fs_type, device, staging_path)
        return staging

    def _format_and_mount(
        self,
        vol: Volume,
        device: str,
        staging_path: str,
        fs_type: FsType,
        readonly: bool,
        flags: tuple[str, ...],
    ) -> None:
        """The safe sequence (rules 1 and 11), in order: probe the device; check what is there
        when it is ours, refuse any other signature, format only what our record says was never
        formatted and blkid finds empty; grow the filesystem before mounting if it grows that
        way (ext4, no capability needed); mount; grow it online otherwise. A staging path that
        already carries this device (a retry) skips to the last step; a mount this call made is
        taken back if that step fails."""
        fs = host_fs.FILESYSTEMS[fs_type]
        top = self._top(staging_path)
        if top is not None and not self._on(top, device):
            raise FailedPrecondition(
                f"{staging_path} already has another filesystem ({top.source}) mounted"
            )
        mounted_here = top is None
        if mounted_here:
            found = self.ctx.fs.probe(device)
            if vol.formatted and found is None:
                raise FailedPrecondition(
                    f"volume {vol.id} should hold {vol.fs_type} but no filesystem signature "
                    "was found; refusing to format a volume that may hold data"
                )
            if not vol.formatted and found is not None and found != fs_type:
                raise FailedPrecondition(
                    f"volume {vol.id} was never formatted by Stowage but carries a {found} "
                    "signature; refusing to format it"
                )
            if found is not None:
                # Ours, or mkfs finished before a crash could record it: check and adopt it.
                self.ctx.fs.check(device, fs_type)
            elif readonly:
                raise FailedPrecondition(
                    f"volume {vol.id} has no filesystem yet and cannot be staged read-only"
                )
            else:
                self.ctx.fs.format(device, fs_type)
                faults.hit("stage:formatted")
            if not vol.formatted:
                self.ctx.backend.amend_record(vol.id, formatted=True, fs_type=fs_type)
                self.ctx.store.set_formatted(vol.id, fs_type)
            if (
                fs.grows_offline
                and not readonly
                and self.ctx.loops.size_bytes(device) - self.ctx.fs.ext4_size(device) > _GROW_SLACK
            ):
                self.ctx.fs.grow_offline(device, fs_type)
            options = [*SAFE_DEFAULTS, *fs.mount_options, *flags, *(["ro"] if readonly else [])]
            self.ctx.mounter.mount(device, staging_path, fs_type, options)
            faults.hit("stage:mounted")
        try:
            # Offline expansion finishes here: the image grew while the volume was not staged.
            if not readonly and not fs.grows_offline:
                size = self.ctx.loops.size_bytes(device)
                if size and size - self.ctx.fs.size_bytes(staging_path) > _GROW_SLACK:
                    self.ctx.fs.grow(device, staging_path, fs_type)
        except Exception:
            if mounted_here:
                self.ctx.mounter.unmount(staging_path)  # ours, from this call: take it back
            raise

    def unstage(self, volume_id: str, staging_path: str) -> None:
        validation.require_volume_id(volume_id)
        staging_path = self._path("staging_target_path", staging_path)
        with self.ctx.locks.hold(volume_id):
            current = self.ctx.store.staging(volume_id)
            if current is not None and current.path != staging_path:
                raise FailedPrecondition(
                    f"volume {volume_id} is staged at {current.path}, not {staging_path}"
                )
            pubs = self.ctx.store.publications(volume_id)
            if pubs:
                raise FailedPrecondition(
                    f"volume {volume_id} is still published at {', '.join(p.target for p in pubs)}"
                )
            image = self.ctx.backend.image_path(volume_id)
            loops = self.ctx.loops.find(image)
            # Its image file deleted by hand while staged: the loop device holds the only copy.
            rescue = [] if loops else self.ctx.deleted_image_loops(volume_id)
            loops = loops or [lo for lo in self.ctx.loops.devices() if lo.device in rescue]
            top = self._top(staging_path)
            if top is not None:
                if not any(self._on(top, lo.device) for lo in loops):
                    raise FailedPrecondition(
                        f"{staging_path} carries a filesystem that is not volume {volume_id}; "
                        "not unmounting it"
                    )
                self.ctx.mounter.unmount(staging_path)
                faults.hit("unstage:unmounted")
            for lo in loops:
                if self._mounts_of(lo.device):
                    raise FailedPrecondition(
                        f"{lo.device} of volume {volume_id} is still mounted elsewhere"
                    )
                if rescue:  # unmounted now, so quiescent: write the image back before detaching
                    self.ctx.rescue_deleted_image(volume_id)
                self.ctx.loops.detach(lo.device)
                faults.hit("unstage:detached")
            self.ctx.store.remove_staging(volume_id)
            log.info("unstaged %s from %s", volume_id, staging_path)

    # --- publish ------------------------------------------------------------------------------
    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target: str,
        cap: Capability,
        readonly: bool,
        pool_uuid: str = "",
        pod_uid: str = "",
    ) -> None:
        """`pod_uid` is the pod the kubelet publishes for (podInfoOnMount): the volume's I/O
        limits go into its cgroups (driver.core.modify)."""
        validation.require_volume_id(volume_id)
        validation.check_pod_uid(pod_uid)
        staging_path = self._path("staging_target_path", staging_path)
        target = self._path("target_path", target)
        if target == staging_path or target.startswith(staging_path + "/"):
            raise InvalidArgument(f"target_path {target} must not be the staging path or inside it")
        validation.check_capability(cap)
        self.ctx.require_healthy()
        self.ctx.require_pool(pool_uuid)
        with self.ctx.locks.hold(volume_id):
            vol = self._volume(volume_id)
            self._check_access(vol, cap)
            readonly = readonly or cap.access_mode.read_only
            existing = self.ctx.store.publication(target)
            if existing is not None:
                if existing.volume_id != volume_id:
                    raise AlreadyExists(f"{target} already publishes volume {existing.volume_id}")
                staging = self.ctx.store.staging(volume_id)
                if staging is not None and self._published_ok(vol, staging, target):
                    # UNKNOWN: a publication found again in the mount table (rebuilt store).
                    adopted = existing.access_mode is AccessMode.UNKNOWN
                    if not adopted and (
                        existing.readonly != readonly or existing.access_mode != cap.access_mode
                    ):
                        raise AlreadyExists(
                            f"volume {volume_id} is already published at {target} with "
                            f"readonly={existing.readonly}"
                        )
                    return
                log.warning("publication of %s at %s is stale; publishing again", volume_id, target)
                if self.ctx.mounter.is_mounted(target):
                    self.ctx.mounter.unmount(target)
                self.ctx.store.remove_publication(target)
            others = [p for p in self.ctx.store.publications(volume_id) if p.target != target]
            if others and (
                cap.access_mode.single_target or any(p.access_mode.single_target for p in others)
            ):
                raise FailedPrecondition(
                    f"volume {volume_id} is {cap.access_mode.name} and already published at "
                    f"{others[0].target}"
                )
            # Rule 7: after a reboot kubelet may publish without staging; check the staging
            # path really carries this volume and stage it again if not.
            staging = self.ctx.store.staging(volume_id)
            if staging is None or staging.path != staging_path or not self._staged_ok(vol, staging):
                if staging is not None and staging.path != staging_path:
                    raise FailedPrecondition(
                        f"volume {volume_id} is staged at {staging.path}, not {staging_path}"
                    )
                staging = self._stage(vol, staging_path, cap)
            self._clear_unrecorded(target, staging.device)
            if vol.access_type is AccessType.BLOCK:
                self.ctx.mounter.ensure_file(target)
                self.ctx.mounter.bind(staging.device, target, readonly=readonly, options=[])
            else:
                self.ctx.mounter.ensure_dir(target)
                flags = validation.check_mount_flags(cap.mount_flags)
                self.ctx.mounter.bind(
                    staging.path, target, readonly=readonly, options=[*SAFE_DEFAULTS, *flags]
                )
                if cap.mount_group and not readonly:
                    self.ctx.host.give_group(target, int(cap.mount_group))
            faults.hit("publish:bound")
            self.ctx.store.put_publication(
                Publication(volume_id, target, readonly, cap.access_mode, pod_uid)
            )
            faults.hit("publish:recorded")
            try:
                self.limits.apply(volume_id, vol.mutable_parameters, staging.device, pod_uid)
            except StowageError as exc:  # the pod runs; reconciliation applies them later
                log.warning("volume %s: I/O limits not applied yet: %s", volume_id, exc)
            log.info("published %s at %s (readonly=%s)", volume_id, target, readonly)

    def _clear_unrecorded(self, target: str, device: str) -> None:
        """A bind with no record is what a crash between bind and record leaves; binding again
        on top would stack a second mount, so take ours away first. Anything else is refused."""
        top = self._top(target)
        if top is None:
            return
        if not self._on(top, device):
            raise FailedPrecondition(f"{target} already has another filesystem ({top.source})")
        log.warning("unrecorded mount of %s at %s (interrupted publish); redoing", device, target)
        self.ctx.mounter.unmount(target)

    def _published_ok(self, vol: Volume, staging: Staging, target: str) -> bool:
        if not self._staged_ok(vol, staging):
            return False
        if staging.access_type is AccessType.BLOCK:
            return self._is_device_at(target, staging.device)
        return self._carries(target, staging.device)

    def _is_device_at(self, path: str, device: str) -> bool:
        at = self.ctx.host.rdev(path)
        return at is not None and at == self.ctx.host.rdev(device)

    def unpublish(self, volume_id: str, target: str) -> None:
        validation.require_volume_id(volume_id)
        target = self._path("target_path", target)
        with self.ctx.locks.hold(volume_id):
            pub = self.ctx.store.publication(target)
            if pub is not None and pub.volume_id != volume_id:
                raise FailedPrecondition(
                    f"{target} publishes volume {pub.volume_id}, not {volume_id}"
                )
            ours = False  # an unrecorded mount that is provably this volume (rebuilt store)
            if self.ctx.mounter.is_mounted(target):
                if pub is None:
                    top = self._top(target)
                    image = self.ctx.backend.image_path(volume_id)
                    devices = [lo.device for lo in self.ctx.loops.find(image)]
                    devices += self.ctx.deleted_image_loops(volume_id)
                    ours = top is not None and any(self._on(top, d) for d in devices)
                    # ...but never its staging mount: recorded, or (no record) the first
                    # filesystem mount of its device, which reconciliation takes for staging.
                    staging = self.ctx.store.staging(volume_id)
                    if staging is not None and staging.path == target:
                        ours = False
                    elif ours and top is not None and top.fs_type != "devtmpfs":
                        first = [
                            m
                            for d in devices
                            for m in self._mounts_of(d)
                            if m.fs_type != "devtmpfs"
                        ][:1]
                        ours = not first or first[0].mount_point != target
                    if not ours:
                        raise FailedPrecondition(
                            f"{target} is mounted but Stowage did not publish {volume_id} there"
                        )
                    log.warning(
                        "%s carries %s with no publication record; unmounting", target, volume_id
                    )
                self.ctx.mounter.unmount(target)
                faults.hit("unpublish:unmounted")
            if ours:
                self.ctx.mounter.remove_target(target)
                return
            if pub is None:
                # Nothing here is known to be ours (never published, or already undone): leave
                # whatever is at the path; kubelet removes its own empty directories.
                log.info("%s is not a publication of %s; nothing to undo", target, volume_id)
                return
            self.ctx.mounter.remove_target(target)
            faults.hit("unpublish:target-removed")
            self.ctx.store.remove_publication(target)
            log.info("unpublished %s from %s", volume_id, target)

    # --- stats and expansion ------------------------------------------------------------------
    def _locate(self, vol: Volume, path: str) -> Staging:
        """The staging of `vol` if `path` is its staging path or one of its targets."""
        missing = NotFound(f"volume {vol.id} is not staged or published at {path!r}")
        if not os.path.isabs(path):
            raise missing
        path = os.path.normpath(path)
        staging = self.ctx.store.staging(vol.id)
        if staging is None:
            raise missing
        if staging.access_type is AccessType.BLOCK:
            if path == staging.path or self._is_device_at(path, staging.device):
                return staging
            raise missing
        if self._carries(path, staging.device):
            return staging
        raise missing

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not path:
            raise InvalidArgument("volume_path is required")
        validation.require_volume_id(volume_id)
        vol = self._volume(volume_id)
        staging = self._locate(vol, path)
        condition = self._condition(vol, staging)
        if staging.access_type is AccessType.BLOCK:
            size = self.ctx.loops.size_bytes(staging.device)
            return VolumeStats(size, 0, 0, None, None, None, condition)
        u = self.ctx.host.fs_usage(path)
        return VolumeStats(
            u.total_bytes,
            u.used_bytes,
            u.available_bytes,
            u.total_inodes,
            u.used_inodes,
            u.available_inodes,
            condition,
        )

    def _condition(self, vol: Volume, staging: Staging) -> Condition:
        if self.ctx.backend.volume_size(vol.id) is None:
            held = self.ctx.deleted_image_loops(vol.id)
            if held:
                return Condition(
                    True,
                    f"the image of {vol.id} was deleted from the pool; its data lives only in "
                    f"{held[0]} until unstaged, and NodeUnstageVolume writes the image back",
                )
            return Condition(True, f"the image of {vol.id} is missing from the pool")
        loop = self._loop(vol)
        if loop is None:
            return Condition(True, f"no loop device backs {vol.id} although it is staged")
        if count := self.ctx.host.fs_errors(loop.device, staging.fs_type):
            return Condition(
                True, f"{staging.fs_type} on {loop.device} recorded {count} error(s); run e2fsck"
            )
        if starved := self.ctx.starved(vol.id, vol.size):
            return Condition(True, starved)
        return Condition(False, "healthy")

    def expand(self, volume_id: str, path: str, rng: CapacityRange | None) -> int:
        """NodeExpandVolume: the only place a volume grows (ControllerExpandVolume only answers
        the size, see `core.controller.expand_request`). Rule 11: image, loop device,
        filesystem, then the recorded size, each step idempotent; a journal entry carries the
        new size across a crash (start-up reconciliation records it once the image has it)."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not path:
            raise InvalidArgument("volume_path is required")
        validation.require_volume_id(volume_id)
        if rng is not None:
            sizing.check_range(rng)
        self.ctx.require_healthy()
        with self.ctx.locks.hold(volume_id):
            vol = self._volume(volume_id)
            staging = self._locate(vol, path)
            if staging.access_type is AccessType.MOUNT and staging.readonly:
                raise FailedPrecondition(f"volume {volume_id} is staged read-only")
            want = max(vol.size, rng.required if rng else 0)
            if rng and rng.limit and want > rng.limit:
                raise OutOfRange(
                    f"volume {volume_id} is {want} bytes, above limit_bytes {rng.limit}; "
                    "volumes never shrink"
                )
            if want > vol.size:
                limit = rng.limit if rng else 0
                want = sizing.resolve_size(CapacityRange(want, limit), vol.fs_type)
                free = self.ctx.backend.usage().available_bytes
                if want - vol.size > free:
                    raise ResourceExhausted(
                        f"the pool has {free} bytes free; growing {volume_id} by "
                        f"{want - vol.size} bytes does not fit"
                    )
            seq = None
            if want > vol.size:
                seq = self.ctx.store.journal_begin("expand-volume", volume_id, {"size": want})
                faults.hit("node-expand:journaled")
            try:
                self.ctx.backend.expand(volume_id, want)
                faults.hit("node-expand:image-grown")
                self.ctx.loops.refresh_capacity(staging.device)
                faults.hit("node-expand:loop-refreshed")
                if staging.fs_type is not None:  # a filesystem (not a block volume)
                    self.ctx.fs.grow(staging.device, staging.path, staging.fs_type)
                    faults.hit("node-expand:fs-grown")
                if want != vol.size:
                    self.ctx.store.set_volume_size(volume_id, want)
                    faults.hit("node-expand:recorded")
            finally:
                # A refused step (ext4 that cannot grow online) leaves the image larger than
                # the record, which the CO's retry completes; only a crash leaves the entry.
                if seq is not None:
                    self.ctx.store.journal_end(seq)
            log.info("expanded %s on the node to %d bytes", volume_id, want)
            return want
