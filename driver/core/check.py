"""`stowagectl check`: every disagreement between metadata, image files, loop devices and mounts.

Read-only: it opens meta.db read-only, lists the pool, the loop devices and the host's mount
table (through the Host interface, driver.host.base.Host), and changes nothing. Reconciliation
(driver start-up) is what repairs; check is what proves there is nothing left to repair — the
crash and concurrency suites run it after every scenario."""

from __future__ import annotations

from dataclasses import dataclass, field

from driver import ids
from driver.host import mountinfo
from driver.host.base import Host
from driver.host.loop import LoopDevice, LoopManager
from driver.model import AccessType
from driver.records import RecordError
from driver.storage.base import VolumeBackend
from driver.storage.store import Store


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect(
    store: Store,
    backend: VolumeBackend,
    loops: LoopManager,
    host: Host,
) -> Findings:
    found = Findings()
    bad = found.problems.append
    entries = host.mounts()

    for _seq, op, key, _payload in store.journal():
        bad(f"{op} of {key} was interrupted and has not been reconciled (is the driver running?)")

    volumes = {v.id: v for v in store.list_volumes()}
    snapshots = {s.id: s for s in store.list_snapshots()}
    for vid, vol in volumes.items():
        size = backend.volume_size(vid)
        if size is None:
            bad(f"volume {vid} ({vol.name!r}) is recorded but its image is missing")
        elif size < vol.size:
            bad(f"volume {vid}: image is {size} bytes, smaller than the recorded {vol.size}")
    for sid, snap in snapshots.items():
        # A backup snapshot whose upload is done may have dropped its local copy by design.
        dropped = ids.is_backup_snapshot_id(sid) and snap.ready
        if not backend.snapshot_exists(sid) and not dropped:
            bad(f"snapshot {sid} ({snap.name!r}) is recorded but its image is missing")
    # Each image's own record, read once: an image without a row is adopted at start-up when
    # it describes itself, trashed otherwise; an image with a row must carry its record.
    rowed = {*volumes, *snapshots}
    images = [("volume", v) for v in sorted(backend.volume_ids())]
    images += [("snapshot", s) for s in sorted(backend.snapshot_ids())]
    for kind, object_id in images:
        try:
            rec = backend.read_record(object_id)
        except RecordError as exc:
            if object_id in rowed:
                bad(f"the record on the image of {object_id} is unreadable ({exc})")
            else:
                bad(f"{kind} image {object_id} has no row and an unreadable record ({exc})")
            continue
        if object_id not in rowed:
            bad(
                f"{kind} image {object_id} has no row and no record (start-up moves it to trash)"
                if rec is None
                else f"{kind} image {object_id} ({rec.name!r}) has no row in meta.db but "
                "describes itself (start-up adopts it)"
            )
        elif rec is None:
            bad(f"the image of {object_id} carries no record (start-up writes it)")
        elif rec.kind == "volume" and object_id in volumes and rec.size < volumes[object_id].size:
            recorded = volumes[object_id].size
            bad(f"the record of {object_id} says {rec.size} bytes, meta.db {recorded}")
    for path in backend.leftovers():
        bad(f"temporary file {path} was left by an interrupted copy")
    for name in backend.claimed_in_trash({*volumes, *snapshots}):
        bad(f"trash item {name} is claimed by a row or its own record (never reclaimed)")

    # Loop devices over pool images.
    by_image: dict[str, list[LoopDevice]] = {}
    for lo in loops.devices():
        if backend.owns(lo.backing_file):
            by_image.setdefault(lo.backing_file, []).append(lo)
    stagings = {s.volume_id: s for s in store.stagings()}
    owners = {backend.image_path(v): v for v in volumes}
    explained: set[str] = set()  # mount points a staging or publication record accounts for
    for image, attached in sorted(by_image.items()):
        devs = ", ".join(lo.device for lo in attached)
        if len(attached) > 1:
            bad(f"image {image} is attached to {len(attached)} loop devices ({devs})")
        for lo in attached:
            if lo.deleted:
                bad(f"{lo.device} still holds the deleted image {image}")
                continue
            owner = owners.get(image)
            staging = stagings.get(owner) if owner else None
            if staging is None or staging.device != lo.device:
                bad(f"{lo.device} backs {image} but no staging record explains it")

    for vid, staging in sorted(stagings.items()):
        if vid not in volumes:
            bad(f"staging record of unknown volume {vid} at {staging.path}")
            continue
        attached = by_image.get(backend.image_path(vid), [])
        if not any(lo.device == staging.device for lo in attached):
            bad(f"volume {vid} is recorded as staged on {staging.device}, which is not its loop")
        if staging.access_type is AccessType.MOUNT:
            tops = mountinfo.mounts_at(staging.path, entries)
            if not tops or not mountinfo.is_on(tops[-1], staging.device):
                bad(f"volume {vid} is recorded as staged at {staging.path}, which is not mounted")
            explained.add(staging.path)

    publications = store.publications()
    for pub in publications:
        staging = stagings.get(pub.volume_id)
        tops = mountinfo.mounts_at(pub.target, entries)
        if pub.volume_id not in volumes:
            bad(f"publication of unknown volume {pub.volume_id} at {pub.target}")
        elif staging is None:
            bad(f"volume {pub.volume_id} is published at {pub.target} but not staged")
        elif not tops or not mountinfo.is_on(tops[-1], staging.device):
            bad(f"volume {pub.volume_id} is recorded as published at {pub.target}, not mounted")
        explained.add(pub.target)

    for image, attached in sorted(by_image.items()):
        for lo in attached:
            seen: set[str] = set()
            for entry in mountinfo.mounts_of(lo.device, entries):
                if entry.mount_point not in explained:
                    bad(f"{lo.device} ({image}) is mounted at {entry.mount_point} with no record")
                elif entry.mount_point in seen:
                    bad(f"{lo.device} ({image}) is mounted more than once at {entry.mount_point}")
                seen.add(entry.mount_point)

    trash = backend.trash()
    if trash:
        oldest = max(t.age_seconds for t in trash)
        total = sum(t.allocated_bytes for t in trash)
        found.notes.append(
            f"trash: {len(trash)} item(s), {total} bytes, oldest {oldest:.0f} s "
            "(stowagectl gc reclaims)"
        )
    found.notes.append(
        f"{len(volumes)} volume(s), {len(snapshots)} snapshot(s), {len(stagings)} staged, "
        f"{len(publications)} publication(s)"
    )
    return found
