"""Start-up reconciliation (design rule 5): bring metadata, files, loop devices and mounts back
into agreement after a crash or a reboot. Nothing is deleted outright, and a complete image that
describes itself is never trashed: one without a row is adopted back into the store (or, if its
record conflicts with a row, left in place and reported). Trash receives only what is provably
temporary: `.tmp` copies and images without a record (made but not yet described when the
process ended, which is before their row could exist)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from driver.core import groups
from driver.core.pool import PoolContext
from driver.errors import StowageError
from driver.host import mountinfo
from driver.host.loop import LoopDevice
from driver.model import AccessMode, AccessType, Publication, Staging
from driver.records import ImageRecord, RecordError

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
    adopted: list[str] = field(default_factory=list)  # images with a record and no row
    described: list[str] = field(default_factory=list)  # rows whose image got its record now
    unclaimed: list[str] = field(default_factory=list)  # images left in place, needing a person
    adopted_mounts: list[str] = field(default_factory=list)
    rescued: list[str] = field(default_factory=list)  # deleted images written back from loops
    claimed_trash: list[str] = field(default_factory=list)
    reclaimed: int = 0

    def problems(self) -> list[str]:
        """What a person should look at: everything but routine clean-up."""
        return (
            [f"image missing for volume {v}" for v in self.missing_images]
            + self.unclaimed
            + [
                f"trash item {t} is claimed (row or record); not reclaimed"
                for t in self.claimed_trash
            ]
        )

    def counts(self) -> dict[str, int]:
        """Per kind, for the stowage_reconcile_findings metric."""
        return {
            "journal_rolled": len(self.journal_rolled),
            "trashed": len(self.trashed),
            "missing_images": len(self.missing_images),
            "detached": len(self.detached),
            "stale_stagings": len(self.stale_stagings),
            "stale_publications": len(self.stale_publications),
            "thawed": len(self.thawed),
            "adopted": len(self.adopted),
            "described": len(self.described),
            "unclaimed": len(self.unclaimed),
            "adopted_mounts": len(self.adopted_mounts),
            "rescued": len(self.rescued),
            "claimed_trash": len(self.claimed_trash),
            "reclaimed": self.reclaimed,
        }


def reconcile(ctx: PoolContext, trash_grace: float = 7 * 86400) -> Report:
    report = Report()
    store, backend = ctx.store, ctx.backend

    # 1. Operations that were under way when the process ended. NodeExpandVolume journals the
    # new size, group snapshots the member images (undone or finished here, before step 2 could
    # adopt a half group's images); other creates and deletes leave their files to step 2,
    # which treats every image the same way.
    for seq, op, key, payload in store.journal():
        for sid in groups.end_interrupted(ctx, op, payload):
            log.warning("removed image of snapshot %s: %s %s did not finish", sid, op, key)
        if op == "expand-volume":
            vol = store.get_volume(key)
            size = backend.volume_size(key)
            if vol is not None and size is not None and size >= int(payload["size"]) > vol.size:
                store.set_volume_size(key, int(payload["size"]))
        report.journal_rolled.append(f"{op} {key}")
        store.journal_end(seq)

    # 2. Files and rows that disagree. Temporary copies go to trash; an image without a row is
    # adopted when it describes itself, trashed when it has no record (made, never described,
    # so never recorded either), and left alone when its record is unreadable or conflicts.
    for path in backend.leftovers():
        if backend.trash_leftover(path):
            report.trashed.append(path)
    _adopt_images(ctx, report)
    known_vols = {v.id for v in store.list_volumes()}
    for vid in sorted(known_vols):
        if backend.volume_size(vid) is None:
            if held := ctx.deleted_image_loops(vid):
                log.error(
                    "the image of volume %s was deleted from the pool; %s still holds it and "
                    "its data is written back when the volume is unstaged",
                    vid,
                    held[0],
                )
                continue
            report.missing_images.append(vid)
            log.error("volume %s is recorded but its image is missing from the pool", vid)
    _describe_images(ctx, report)

    # 3. Staging and publication records against the mount table (a reboot empties it).
    entries = ctx.host.mounts()
    stagings = {s.volume_id: s for s in store.stagings()}
    all_loops = ctx.loops.devices()  # one sysfs pass, not one per staging
    loops_by_file: dict[str, list[LoopDevice]] = {}
    for lo in all_loops:
        if not lo.deleted:
            loops_by_file.setdefault(lo.backing_file, []).append(lo)
    # A loop that holds a deleted image still carries the volume: its staging stays live.
    held_by = {lo.backing_file: [lo] for lo in all_loops if lo.deleted}
    for vid, staging in list(stagings.items()):
        image = backend.image_path(vid)
        found = (loops_by_file.get(image) or held_by.get(image, [])) if vid in known_vols else []
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
    _adopt_mounts(ctx, known_vols, stagings, entries, report)

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
        # An image deleted by hand while attached: this device holds the only copy.
        if loop.deleted and owner is not None and ctx.rescue_deleted_image(owner):
            report.rescued.append(owner)
        live = stagings.get(owner) if owner is not None and not loop.deleted else None
        if live is None or live.device != loop.device:
            ctx.loops.detach(loop.device)
            report.detached.append(loop.device)

    # 5. Trash older than the grace period is reclaimed; younger trash waits for an operator.
    # Never an item a row or its own record claims (someone moved an image there by hand).
    claimed = known_vols | {s.id for s in store.list_snapshots()}
    report.claimed_trash = backend.claimed_in_trash(claimed)
    report.reclaimed = backend.empty_trash(older_than=trash_grace, claimed=claimed)

    log.info(
        "reconciled: %d journal entries, %d temporary files to trash, %d loops detached, "
        "%d stale stagings, %d stale publications, %d missing images, %d images adopted, "
        "%d records written, %d mounts adopted",
        len(report.journal_rolled),
        len(report.trashed),
        len(report.detached),
        len(report.stale_stagings),
        len(report.stale_publications),
        len(report.missing_images),
        len(report.adopted),
        len(report.described),
        len(report.adopted_mounts),
    )
    return report


def _adopt_images(ctx: PoolContext, report: Report) -> None:
    store, backend = ctx.store, ctx.backend
    found = [("volume", v) for v in backend.volume_ids() - {v.id for v in store.list_volumes()}]
    found += [
        ("snapshot", s) for s in backend.snapshot_ids() - {s.id for s in store.list_snapshots()}
    ]
    for kind, object_id in sorted(found):
        try:
            rec = backend.read_record(object_id)
        except RecordError as exc:
            report.unclaimed.append(f"{kind} image {object_id} has an unreadable record ({exc})")
            continue
        if rec is None:
            if backend.trash_orphan(kind, object_id):
                report.trashed.append(object_id)
            continue
        if rec.pool_uuid and ctx.pool_uuid and rec.pool_uuid != ctx.pool_uuid:
            report.unclaimed.append(
                f"{kind} image {object_id} describes itself as part of pool {rec.pool_uuid}"
            )
            continue
        taken = (
            store.volume_by_name(rec.name) if kind == "volume" else store.snapshot_by_name(rec.name)
        )
        if taken is not None:
            report.unclaimed.append(
                f"{kind} image {object_id} is named {rec.name!r}, which {taken.id} holds"
            )
            continue
        if kind == "volume":
            store.add_volume(rec.volume())
        else:
            store.add_snapshot(rec.snapshot())
        report.adopted.append(object_id)
        log.warning(
            "adopted %s %s (%r) from its own record: its image had no row in meta.db",
            kind,
            object_id,
            rec.name,
        )


def _describe_images(ctx: PoolContext, report: Report) -> None:
    """Rows whose image has no record (images made before records existed) get one now, so
    the store can always be rebuilt from the images."""
    store, backend = ctx.store, ctx.backend
    wanted: list[ImageRecord] = [
        ImageRecord.of_volume(v, ctx.pool_uuid) for v in store.list_volumes()
    ] + [ImageRecord.of_snapshot(s, ctx.pool_uuid) for s in store.list_snapshots()]
    for rec in wanted:
        try:
            if backend.read_record(rec.id) is not None:
                continue
        except RecordError:
            continue  # someone's record, if damaged: reported by check, not overwritten
        exists = (
            backend.volume_size(rec.id) is not None
            if rec.kind == "volume"
            else backend.snapshot_exists(rec.id)
        )
        if exists:
            backend.write_record(rec)
            report.described.append(rec.id)


def _adopt_mounts(
    ctx: PoolContext,
    known_vols: set[str],
    stagings: dict[str, Staging],
    entries: list[mountinfo.MountEntry],
    report: Report,
) -> None:
    """Mounts of a volume's loop device with no staging record (a rebuilt store) are recorded
    again: in mount-table order the first filesystem mount is the staging mount, the later ones
    its publications. Block volumes' staging paths are not in the mount table; their next
    NodePublish records them again."""
    store, backend = ctx.store, ctx.backend
    by_file = ctx.loops.by_backing_file()
    recorded_targets = {p.target for p in store.publications()}
    for vid in sorted(known_vols - set(stagings)):
        loops = by_file.get(backend.image_path(vid), [])
        if len(loops) != 1:
            continue
        vol = store.get_volume(vid)
        if vol is None or vol.access_type is not AccessType.MOUNT:
            continue
        device = loops[0].device
        mounts = [m for m in mountinfo.mounts_of(device, entries) if m.fs_type != "devtmpfs"]
        if not mounts:
            continue
        first, rest = mounts[0], mounts[1:]
        staging = Staging(
            vid, first.mount_point, device, AccessType.MOUNT, vol.fs_type, first.read_only, ()
        )
        store.put_staging(staging)
        stagings[vid] = staging
        report.adopted_mounts.append(first.mount_point)
        for m in rest:
            if m.mount_point in recorded_targets:
                continue
            store.put_publication(Publication(vid, m.mount_point, m.read_only, AccessMode.UNKNOWN))
            report.adopted_mounts.append(m.mount_point)
        log.warning(
            "volume %s is mounted at %s with no staging record: recorded it again%s",
            vid,
            first.mount_point,
            f" with {len(rest)} publication(s)" if rest else "",
        )


def _thaw(ctx: PoolContext, device: str, mount_point: str, report: Report) -> None:
    try:
        thawed = ctx.fs.thaw(mount_point)
    except (OSError, StowageError) as exc:
        log.error("could not check %s on %s for a frozen filesystem: %s", mount_point, device, exc)
        return
    if thawed:
        report.thawed.append(mount_point)
        log.warning("thawed %s, left frozen by an interrupted snapshot", device)
