"""Start-up reconciliation (design rule 5): bring metadata, files, loop devices and mounts back
into agreement after a crash or a reboot. Nothing is deleted outright: orphans go to trash."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from driver.core.pool import PoolContext
from driver.errors import StowageError
from driver.host import mountinfo
from driver.model import AccessType

log = logging.getLogger(__name__)


@dataclass
class Report:
    journal_rolled: list[str] = field(default_factory=list)
    trashed: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    stale_stagings: list[str] = field(default_factory=list)
    stale_publications: list[str] = field(default_factory=list)
    thawed: list[str] = field(default_factory=list)
    reclaimed: int = 0

    def problems(self) -> list[str]:
        """What a person should look at: everything but routine clean-up."""
        return [f"image missing for volume {v}" for v in self.missing_images]


def reconcile(ctx: PoolContext, trash_grace: float = 7 * 86400) -> Report:
    report = Report()
    store, backend = ctx.store, ctx.backend

    # 1. Operations that were under way when the process ended.
    # Only NodeExpandVolume journals (the new size); single-file operations need no entry, their
    # leftovers are orphans that step 2 finds.
    for seq, op, key, payload in store.journal():
        if op == "expand-volume":
            vol = store.get_volume(key)
            size = backend.volume_size(key)
            if vol is not None and size is not None and size >= int(payload["size"]) > vol.size:
                store.set_volume_size(key, int(payload["size"]))
        report.journal_rolled.append(f"{op} {key}")
        store.journal_end(seq)

    # 2. Files no row describes (a crash between writing a file and recording it).
    known_vols = {v.id for v in store.list_volumes()}
    for vid in sorted(backend.volume_ids() - known_vols):
        if backend.trash_orphan("volume", vid):
            report.trashed.append(vid)
    known_snaps = {s.id for s in store.list_snapshots()}
    for sid in sorted(backend.snapshot_ids() - known_snaps):
        if backend.trash_orphan("snapshot", sid):
            report.trashed.append(sid)
    for vid in sorted(known_vols):
        if backend.volume_size(vid) is None:
            report.missing_images.append(vid)
            log.error("volume %s is recorded but its image is missing from the pool", vid)

    # 3. Staging and publication records against the mount table (a reboot empties it).
    entries = ctx.host.mounts()
    stagings = {s.volume_id: s for s in store.stagings()}
    loops_by_file = ctx.loops.by_backing_file()  # one sysfs pass, not one per staging
    for vid, staging in list(stagings.items()):
        found = loops_by_file.get(backend.image_path(vid), []) if vid in known_vols else []
        ok = len(found) == 1 and found[0].device == staging.device
        if ok and staging.access_type is AccessType.MOUNT:
            tops = mountinfo.mounts_at(staging.path, entries)
            ok = bool(tops) and mountinfo.is_on(tops[-1], staging.device)
        if not ok:
            del stagings[vid]
            store.remove_staging(vid)
            report.stale_stagings.append(vid)
            for pub in store.publications(vid):
                store.remove_publication(pub.target)
                report.stale_publications.append(pub.target)
    for pub in store.publications():
        if not mountinfo.mounts_at(pub.target, entries):
            store.remove_publication(pub.target)
            report.stale_publications.append(pub.target)

    # 4. Loop devices of pool images that no live staging record explains. A filesystem on one
    # of them may still be frozen: FIFREEZE outlives the process that took a snapshot and was
    # killed before it could thaw, and every writer in the pod would hang until thawed.
    pool_images = {backend.image_path(v): v for v in known_vols}
    for loop in ctx.loops.devices():
        if not backend.owns(loop.backing_file):
            continue
        mounts = mountinfo.mounts_of(loop.device, entries)
        if mounts:
            # Only a filesystem can be frozen; a raw block volume's mounts are binds of its
            # device node (files). Best effort: a mount point that cannot be opened must not
            # stop the driver from starting.
            fs_mounts = [m for m in mounts if m.fs_type != "devtmpfs"]
            if fs_mounts:
                _thaw(ctx, loop.device, fs_mounts[0].mount_point, report)
            continue  # in use; never pull a device from under a mount
        owner = pool_images.get(loop.backing_file)
        live = stagings.get(owner) if owner is not None and not loop.deleted else None
        if live is None or live.device != loop.device:
            ctx.loops.detach(loop.device)
            report.detached.append(loop.device)

    # 5. Trash older than the grace period is reclaimed; younger trash waits for an operator.
    report.reclaimed = backend.empty_trash(older_than=trash_grace)

    log.info(
        "reconciled: %d journal entries, %d orphans to trash, %d loops detached, "
        "%d stale stagings, %d stale publications, %d missing images",
        len(report.journal_rolled),
        len(report.trashed),
        len(report.detached),
        len(report.stale_stagings),
        len(report.stale_publications),
        len(report.missing_images),
    )
    return report


def _thaw(ctx: PoolContext, device: str, mount_point: str, report: Report) -> None:
    try:
        thawed = ctx.fs.thaw(mount_point)
    except (OSError, StowageError) as exc:
        log.error("could not check %s on %s for a frozen filesystem: %s", mount_point, device, exc)
        return
    if thawed:
        report.thawed.append(mount_point)
        log.warning("thawed %s, left frozen by an interrupted snapshot", device)
