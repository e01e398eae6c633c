"""driver.core.reconcile: start-up repair against the fake host (rule 5)."""

from __future__ import annotations

import os

from driver.core.controller import ControllerCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.core.reconcile import reconcile
from driver.model import AccessMode, AccessType, Capability, CapacityRange, MiB, Publication
from tests.unit.fakes import FakeHost

RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
BLOCK = Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER)


def test_half_done_create_is_rolled_back_to_trash(ctx: PoolContext, host: FakeHost) -> None:
    vid = "v-" + "1" * 32
    # An entry of an operation that no longer journals (an older driver's) is simply dropped.
    ctx.store.journal_begin("create-volume", vid, {"name": "n"})
    ctx.backend.create(vid, MiB)  # the file was written, the row never was
    report = reconcile(ctx)
    assert vid in report.trashed
    assert ctx.backend.volume_ids() == set()
    assert ctx.store.journal() == []
    trash = os.listdir(os.path.join(ctx.backend.root, "trash"))  # type: ignore[attr-defined]
    assert any(n.startswith(f"volume-{vid}-") for n in trash)  # moved, not deleted


def test_orphan_files_go_to_trash_known_ones_stay(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    keep = controller.create_volume("keep", [RW], CapacityRange(MiB), {}, None)
    orphan = "v-" + "2" * 32
    ctx.backend.create(orphan, MiB)  # no record: made but never described, so never recorded
    leftover = ctx.backend.image_path("v-" + "3" * 32) + ".tmp"
    open(leftover, "wb").close()
    report = reconcile(ctx)
    assert sorted(report.trashed) == sorted([orphan, leftover])
    assert ctx.backend.volume_ids() == {keep.id}
    assert ctx.backend.leftovers() == []
    assert report.problems() == []


def test_missing_image_is_reported_not_forgotten(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = controller.create_volume("v", [RW], CapacityRange(MiB), {}, None)
    os.unlink(ctx.backend.image_path(v.id))
    report = reconcile(ctx)
    assert report.missing_images == [v.id]
    assert ctx.store.get_volume(v.id) is not None
    assert report.problems() == [f"image missing for volume {v.id}"]


def test_expand_rolls_forward_only_when_image_grew(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = controller.create_volume("v", [RW], CapacityRange(MiB), {}, None)
    ctx.store.journal_begin("expand-volume", v.id, {"size": 4 * MiB})
    ctx.backend.expand(v.id, 4 * MiB)
    w = controller.create_volume("w", [RW], CapacityRange(MiB), {}, None)
    ctx.store.journal_begin("expand-volume", w.id, {"size": 4 * MiB})  # image never grew
    reconcile(ctx)
    assert ctx.store.get_volume(v.id).size == 4 * MiB  # type: ignore[union-attr]
    assert ctx.store.get_volume(w.id).size == MiB  # type: ignore[union-attr]
    assert ctx.store.journal() == []


def _stage_then_lose_mounts(
    controller: ControllerCore, node: NodeCore, ctx: PoolContext, host: FakeHost, kubelet: str
) -> str:
    v = controller.create_volume("v", [RW], CapacityRange(16 * MiB), {}, None)
    node.stage(v.id, os.path.join(kubelet, "s"), RW)
    ctx.store.put_publication(
        Publication(v.id, os.path.join(kubelet, "t"), False, AccessMode.SINGLE_NODE_WRITER)
    )
    host.mount_table.clear()  # the mounts vanished (crash, manual umount); the loop is still there
    return v.id


def test_stale_staging_and_publication_are_dropped(
    controller: ControllerCore, node: NodeCore, ctx: PoolContext, host: FakeHost, kubelet: str
) -> None:
    vid = _stage_then_lose_mounts(controller, node, ctx, host, kubelet)
    report = reconcile(ctx)
    assert report.stale_stagings == [vid]
    assert report.stale_publications == [os.path.join(kubelet, "t")]
    assert ctx.store.staging(vid) is None and ctx.store.publications() == []


def test_loop_of_a_stale_staging_is_detached(
    controller: ControllerCore, node: NodeCore, ctx: PoolContext, host: FakeHost, kubelet: str
) -> None:
    """The loop pass runs before the staging pass, so it keeps the loop device of a staging
    record that the next pass finds stale and deletes: an unused loop stays attached."""
    _stage_then_lose_mounts(controller, node, ctx, host, kubelet)
    report = reconcile(ctx)
    assert report.detached == ["/dev/loop900"]
    assert host.loop_devices() == []


def test_unrecorded_unmounted_pool_loop_is_detached(
    controller: ControllerCore, ctx: PoolContext, host: FakeHost
) -> None:
    v = controller.create_volume("v", [RW], CapacityRange(MiB), {}, None)
    dev = host.add_loop(ctx.backend.image_path(v.id))  # attached, but no staging record
    report = reconcile(ctx)
    assert report.detached == [dev] and host.loop_devices() == []
    assert ["losetup", "--detach", dev] in host.runner.calls


def test_mounted_loops_and_foreign_loops_are_left_alone(
    controller: ControllerCore, node: NodeCore, ctx: PoolContext, host: FakeHost, kubelet: str
) -> None:
    v = controller.create_volume("v", [RW], CapacityRange(16 * MiB), {}, None)
    node.stage(v.id, os.path.join(kubelet, "s"), RW)
    foreign = host.add_loop("/var/lib/other.img")
    orphan_loop = host.add_loop(ctx.backend.image_path("v-" + "9" * 32))
    host.add_mount(orphan_loop, "/somewhere")  # unknown image but mounted: never detached
    report = reconcile(ctx)
    assert report.detached == []
    assert report.stale_stagings == []
    assert set(host.loop_devices()) == {"/dev/loop900", foreign, orphan_loop}


def test_filesystem_left_frozen_by_a_crash_is_thawed(
    controller: ControllerCore, ctx: PoolContext, host: FakeHost, tmp_path: os.PathLike[str]
) -> None:
    """FIFREEZE outlives the process that took it: start-up must thaw, or writers hang."""
    v = controller.create_volume("v", [RW], CapacityRange(MiB), {}, None)
    staging = os.path.join(str(tmp_path), "staging")
    os.mkdir(staging)
    NodeCore(ctx).stage(v.id, staging, RW)
    ctx.fs.left_frozen.add(staging)  # type: ignore[attr-defined]
    report = reconcile(ctx)
    assert report.thawed == [staging]
    assert ("thaw-check", staging) in ctx.fs.events  # type: ignore[attr-defined]


def test_published_raw_block_volume_does_not_stop_start_up(
    controller: ControllerCore, ctx: PoolContext, tmp_path: os.PathLike[str]
) -> None:
    """A raw block volume's mounts are binds of its device node, files rather than
    filesystems: the frozen-filesystem check must skip them (it used to open one with
    O_DIRECTORY, and the driver could not start while a block volume was published)."""
    v = controller.create_volume("b", [BLOCK], CapacityRange(MiB), {}, None)
    staging = os.path.join(str(tmp_path), "staging")
    target = os.path.join(str(tmp_path), "target")
    os.mkdir(staging)
    node = NodeCore(ctx)
    node.stage(v.id, staging, BLOCK)
    node.publish(v.id, staging, target, BLOCK, False)
    report = reconcile(ctx)
    assert report.thawed == []
    assert not [e for e in ctx.fs.events if e[0] == "thaw-check"]  # type: ignore[attr-defined]
    assert [p.target for p in ctx.store.publications(v.id)] == [target]
