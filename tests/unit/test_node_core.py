"""driver.core.node.NodeCore on a real Store and ImagePool with a fake host: the data-safety
rules 1 (format only when safe), 2 (one loop per image), 3 (no recursive delete),
7 (publish verifies staging), 8 (nosuid,nodev) and 11 (expansion order)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from driver.core.controller import ControllerCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from driver.model import AccessMode, AccessType, Capability, CapacityRange, MiB, Volume
from tests.unit.fakes import FakeHost

RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
RO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_READER_ONLY)
BLOCK = Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER)
DEV = "/dev/loop900"  # the first device the fake host hands out


def make(
    controller: ControllerCore,
    fs: str = "ext4",
    access: AccessType = AccessType.MOUNT,
    name: str = "pvc",
) -> Volume:
    cap = Capability(access, AccessMode.SINGLE_NODE_WRITER)
    size = 300 * MiB if fs == "xfs" else 16 * MiB
    return controller.create_volume(
        name, [cap], CapacityRange(size), {"fsType": fs} if access is AccessType.MOUNT else {}, None
    )


def mkfs_calls(host: FakeHost) -> list[list[str]]:
    return [c for c in host.runner.calls if c[0].startswith("mkfs")]


def progs(host: FakeHost) -> list[str]:
    return [c[0] if c[0] != "losetup" else "losetup " + c[1] for c in host.runner.calls]


# --- rule 1: format only when metadata says unformatted AND blkid finds nothing -------------------
def test_fresh_volume_is_formatted_then_mounted(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == [
        [
            "mkfs.ext4",
            "-F",
            "-q",
            "-m0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            DEV,
        ]
    ]
    assert ["blkid", "-p", "-o", "export", "--", DEV] in host.runner.calls
    order = progs(host)
    assert order.index("blkid") < order.index("mkfs.ext4") < order.index("mount")
    assert host.runner.progs("mount") == [
        ["mount", "-t", "ext4", "-o", "nosuid,nodev", "--", DEV, staging]
    ]
    assert ctx.store.get_volume(v.id).formatted is True  # type: ignore[union-attr]
    st = ctx.store.staging(v.id)
    assert st is not None and (st.path, st.device, st.fs_type, st.readonly) == (
        staging,
        DEV,
        "ext4",
        False,
    )
    assert os.path.isdir(staging)


def test_recorded_as_formatted_but_no_signature_is_never_formatted(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    ctx.store.set_formatted(v.id, "ext4")
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == [] and host.runner.progs("mount") == []
    assert ctx.store.staging(v.id) is None


@pytest.mark.parametrize(
    ("found", "requested"), [("xfs", "ext4"), ("btrfs", "xfs"), ("LVM2_member", "ext4")]
)
def test_foreign_signature_on_unformatted_volume_is_never_formatted(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    found: str,
    requested: str,
) -> None:
    v = make(controller, requested)
    host.signatures[DEV] = found
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == [] and host.runner.progs("mount") == []
    assert ctx.store.get_volume(v.id).formatted is False  # type: ignore[union-attr]


def test_partition_table_signature_is_never_formatted(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    host.runner.on("blkid", stdout=f"DEVNAME={DEV}\nPTUUID=abcd\nPTTYPE=dos\n")
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == []


@pytest.mark.parametrize("status", [1, 4, 8, 127])
def test_blkid_error_is_never_treated_as_empty(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    status: int,
) -> None:
    v = make(controller)
    host.blkid_error = status
    with pytest.raises(Internal):
        node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == [] and host.runner.progs("mount") == []
    assert ctx.store.get_volume(v.id).formatted is False  # type: ignore[union-attr]
    assert ctx.store.staging(v.id) is None


def test_crash_after_mkfs_is_adopted_not_reformatted(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    host.signatures[DEV] = "ext4"  # mkfs finished, the record did not
    node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == []
    assert ["e2fsck", "-p", "--", DEV] in host.runner.calls
    assert ctx.store.get_volume(v.id).formatted is True  # type: ignore[union-attr]


def test_formatted_volume_is_checked_not_formatted(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    ctx.store.set_formatted(v.id, "ext4")
    host.signatures[DEV] = "ext4"
    node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == []
    assert ["e2fsck", "-p", "--", DEV] in host.runner.calls


def test_e2fsck_failure_stops_the_mount(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    ctx.store.set_formatted(v.id, "ext4")
    host.signatures[DEV] = "ext4"
    host.runner.on("e2fsck", rc=4, stderr="UNEXPECTED INCONSISTENCY")
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert host.runner.progs("mount") == [] and mkfs_calls(host) == []


def test_read_only_stage_of_unformatted_volume_is_failed_precondition(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RO)
    assert mkfs_calls(host) == [] and host.runner.progs("mount") == []
    assert ctx.store.get_volume(v.id).formatted is False  # type: ignore[union-attr]


def test_block_volume_staged_as_mount_is_failed_precondition(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller, access=AccessType.BLOCK)
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert host.runner.calls == []  # not even a loop device


def test_mount_volume_staged_as_block_is_failed_precondition(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, BLOCK)
    assert host.runner.calls == []


def test_formatted_volume_requested_with_other_fs_is_failed_precondition(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    ctx.store.set_formatted(v.id, "ext4")
    with pytest.raises(FailedPrecondition):
        node.stage(
            v.id, staging, Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "xfs")
        )
    assert host.runner.calls == []


def test_block_stage_attaches_without_probing_or_formatting(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller, access=AccessType.BLOCK)
    node.stage(v.id, staging, BLOCK)
    assert [c[0] for c in host.runner.calls] == ["losetup"]
    assert host.runner.calls[0] == [
        "losetup",
        "--find",
        "--show",
        "--sector-size=4096",
        "--direct-io=on",
        ctx.backend.image_path(v.id),
    ]
    st = ctx.store.staging(v.id)
    assert st is not None and st.device == DEV and st.access_type is AccessType.BLOCK


# --- mount options (rule 8) -----------------------------------------------------------------------
def test_read_only_xfs_stage_options(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller, "xfs")
    ctx.store.set_formatted(v.id, "xfs")
    host.signatures[DEV] = "xfs"
    cap = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_READER_ONLY, "xfs", ("noatime",))
    node.stage(v.id, staging, cap)
    assert host.runner.progs("mount") == [
        ["mount", "-t", "xfs", "-o", "nosuid,nodev,nouuid,noatime,ro", "--", DEV, staging]
    ]
    assert not host.runner.ran("xfs_growfs") and not host.runner.ran("e2fsck")


def test_stage_with_forbidden_flag_touches_nothing(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    from driver.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        node.stage(
            v.id,
            staging,
            Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, mount_flags=("rw,suid",)),
        )
    assert host.runner.calls == []


# --- stage idempotency, rule 2 --------------------------------------------------------------------
def test_stage_is_idempotent(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str, kubelet: str
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    n = len(host.runner.calls)
    node.stage(v.id, staging, RW)
    assert len(host.runner.calls) == n  # nothing run again
    with pytest.raises(AlreadyExists):
        node.stage(
            v.id,
            staging,
            Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, mount_flags=("noatime",)),
        )
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, os.path.join(kubelet, "elsewhere"), RW)
    assert host.loop_devices() == [DEV]


def test_stage_reuses_the_existing_loop_device(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    dev = host.add_loop(ctx.backend.image_path(v.id))
    node.stage(v.id, staging, RW)
    assert not any(c[:2] == ["losetup", "--find"] for c in host.runner.calls)
    assert ctx.store.staging(v.id).device == dev  # type: ignore[union-attr]
    assert host.loop_devices() == [dev]


def test_stage_refuses_image_on_two_loop_devices(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    host.add_loop(ctx.backend.image_path(v.id))
    host.add_loop(ctx.backend.image_path(v.id))
    with pytest.raises(Internal):
        node.stage(v.id, staging, RW)
    assert host.runner.calls == []


def test_stage_onto_foreign_mount_is_failed_precondition(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    os.mkdir(staging)
    host.add_mount("/dev/sda1", staging)
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert mkfs_calls(host) == [] and host.runner.progs("mount") == []


def test_stage_missing_image_or_volume(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    os.unlink(ctx.backend.image_path(v.id))
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    with pytest.raises(NotFound):
        node.stage("v-" + "0" * 32, staging, RW)
    with pytest.raises(NotFound):
        node.stage("../../etc", staging, RW)
    assert host.runner.calls == []


# --- unstage (rule 3) -----------------------------------------------------------------------------
def test_unstage_unmounts_detaches_and_forgets(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    node.unstage(v.id, staging)
    assert ["umount", "--", staging] in host.runner.calls
    assert ["losetup", "--detach", DEV] in host.runner.calls
    assert host.mount_table == [] and host.loop_devices() == []
    assert ctx.store.staging(v.id) is None
    assert os.path.isdir(staging)  # kubelet owns the staging directory
    node.unstage(v.id, staging)  # idempotent


def test_unstage_refuses_foreign_mount(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    os.mkdir(staging)
    host.add_mount("/dev/sda1", staging)
    with pytest.raises(FailedPrecondition):
        node.unstage(v.id, staging)
    assert not host.runner.ran("umount")


def test_unstage_while_published_or_mounted_elsewhere(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str, target: str
) -> None:
    v = make(controller)
    node.publish(v.id, staging, target, RW, False)
    with pytest.raises(FailedPrecondition):
        node.unstage(v.id, staging)
    assert not host.runner.ran("umount")
    node.unpublish(v.id, target)
    host.add_mount(DEV, "/somewhere/else")
    with pytest.raises(FailedPrecondition):
        node.unstage(v.id, staging)
    assert not any(c[:2] == ["losetup", "--detach"] for c in host.runner.calls)


# --- publish (rule 7) -----------------------------------------------------------------------------
def test_publish_binds_with_safe_defaults(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    node.publish(v.id, staging, target, RW, True)
    assert host.runner.progs("mount")[-2:] == [
        ["mount", "--bind", "--", staging, target],
        ["mount", "-o", "remount,bind,nosuid,nodev,ro", "--", target],
    ]
    pub = ctx.store.publication(target)
    assert pub is not None and pub.readonly and pub.volume_id == v.id
    n = len(host.runner.calls)
    node.publish(v.id, staging, target, RW, True)  # idempotent
    assert len(host.runner.calls) == n
    with pytest.raises(AlreadyExists):
        node.publish(v.id, staging, target, RW, False)


def test_publish_without_stage_stages_first(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    node.publish(v.id, staging, target, RW, False)
    mounts = host.runner.progs("mount")
    assert mounts[0] == ["mount", "-t", "ext4", "-o", "nosuid,nodev", "--", DEV, staging]
    assert mounts[1] == ["mount", "--bind", "--", staging, target]
    assert ctx.store.staging(v.id) is not None


def test_publish_after_reboot_restages_instead_of_binding_empty_dir(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    # reboot: the record survives, the loop device and the mount do not
    host.mount_table.clear()
    host.runner.run(["losetup", "--detach", DEV])
    host.runner.calls.clear()
    node.publish(v.id, staging, target, RW, False)
    mounts = host.runner.progs("mount")
    assert mounts[0][:2] == ["mount", "-t"] and mounts[0][-1] == staging
    assert mounts[1] == ["mount", "--bind", "--", staging, target]
    assert mkfs_calls(host) == []  # it was formatted before the reboot: never again
    top = host.top(target)
    assert top is not None and top.source == ctx.store.staging(v.id).device  # type: ignore[union-attr]


def test_publish_with_other_staging_path_is_failed_precondition(
    node: NodeCore,
    controller: ControllerCore,
    host: FakeHost,
    staging: str,
    target: str,
    kubelet: str,
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    with pytest.raises(FailedPrecondition):
        node.publish(v.id, os.path.join(kubelet, "other"), target, RW, False)
    assert host.top(target) is None


def test_single_writer_publishes_once(
    node: NodeCore, controller: ControllerCore, staging: str, target: str, kubelet: str
) -> None:
    v = make(controller)
    sw = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_SINGLE_WRITER)
    node.publish(v.id, staging, target, sw, False)
    with pytest.raises(FailedPrecondition):
        node.publish(v.id, staging, os.path.join(kubelet, "second"), sw, False)


def test_publish_block_volume_binds_device(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str, target: str
) -> None:
    v = make(controller, access=AccessType.BLOCK)
    node.publish(v.id, staging, target, BLOCK, False)
    assert os.path.isfile(target)
    assert host.runner.progs("mount") == [
        ["mount", "--bind", "--", DEV, target],
        ["mount", "-o", "remount,bind", "--", target],
    ]


# --- unpublish (rule 3) ---------------------------------------------------------------------------
def test_unpublish_unmounts_and_rmdirs(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    node.publish(v.id, staging, target, RW, False)
    node.unpublish(v.id, target)
    assert host.runner.calls[-1] == ["umount", "--", target]
    assert not os.path.exists(target)
    assert ctx.store.publication(target) is None
    node.unpublish(v.id, target)  # idempotent


def test_unpublish_never_deletes_contents(
    node: NodeCore, controller: ControllerCore, host: FakeHost, target: str
) -> None:
    v = make(controller)
    os.mkdir(target)
    with open(os.path.join(target, "data"), "w") as fh:
        fh.write("precious")
    node.unpublish(v.id, target)  # never published there: nothing to undo, nothing removed
    with open(os.path.join(target, "data")) as fh:
        assert fh.read() == "precious"


def test_unpublish_refuses_mount_we_did_not_make(
    node: NodeCore, controller: ControllerCore, host: FakeHost, target: str
) -> None:
    v = make(controller)
    os.mkdir(target)
    host.add_mount("/dev/sda1", target)
    with pytest.raises(FailedPrecondition):
        node.unpublish(v.id, target)
    assert not host.runner.ran("umount") and os.path.isdir(target)


# --- expansion (rule 11) --------------------------------------------------------------------------
def test_node_expand_order(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    events: list[str] = []
    real_expand = ctx.backend.expand

    def spy_expand(vid: str, size: int) -> None:
        events.append(f"image {size}")
        real_expand(vid, size)

    monkeypatch.setattr(ctx.backend, "expand", spy_expand)
    real_run = host.runner.run

    def spy_run(argv: list[str], **kw: object):  # type: ignore[no-untyped-def]
        events.append(" ".join(argv))
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(host.runner, "run", spy_run)
    assert node.expand(v.id, staging, CapacityRange(32 * MiB)) == 32 * MiB
    assert events == [f"image {32 * MiB}", f"losetup --set-capacity {DEV}", f"resize2fs -- {DEV}"]
    assert ctx.loops.size_bytes(DEV) == 32 * MiB
    assert ctx.store.get_volume(v.id).size == 32 * MiB  # type: ignore[union-attr]
    assert ctx.store.journal() == []


def test_node_expand_refused_growth_leaves_no_journal_and_the_retry_completes(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    staging: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ext4 without CAP_SYS_RESOURCE: the image grew, the filesystem could not. The record keeps
    the old size, no journal entry stays open (stowagectl check would flag it), and the CO's
    retry grows the rest."""
    v = make(controller)
    node.stage(v.id, staging, RW)
    real_grow = ctx.fs.grow

    def refuse(*args: object) -> None:
        raise FailedPrecondition("the kernel refused to resize ext4")

    monkeypatch.setattr(ctx.fs, "grow", refuse)
    with pytest.raises(FailedPrecondition):
        node.expand(v.id, staging, CapacityRange(32 * MiB))
    assert ctx.backend.volume_size(v.id) == 32 * MiB
    assert ctx.store.get_volume(v.id).size == v.size  # type: ignore[union-attr]
    assert ctx.store.journal() == []
    monkeypatch.setattr(ctx.fs, "grow", real_grow)
    assert node.expand(v.id, staging, CapacityRange(32 * MiB)) == 32 * MiB
    assert ctx.store.get_volume(v.id).size == 32 * MiB  # type: ignore[union-attr]


def test_node_expand_unknown_path_is_not_found(
    node: NodeCore, controller: ControllerCore, staging: str, kubelet: str
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    with pytest.raises(NotFound):
        node.expand(v.id, os.path.join(kubelet, "nope"), CapacityRange(32 * MiB))
    with pytest.raises(NotFound):
        node.stats(v.id, os.path.join(kubelet, "nope"))


def test_publish_over_an_unrecorded_bind_of_this_volume_rebinds_once(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    """A crash between bind and record leaves a bind; the retry must not stack a second one."""
    v = make(controller)
    node.stage(v.id, staging, RW)
    os.mkdir(target)
    host.add_mount(DEV, target)  # the bind the crashed call made; no publication record
    node.publish(v.id, staging, target, RW, False)
    assert len([m for m in host.mount_table if m.mount_point == os.path.normpath(target)]) == 1
    assert ctx.store.publication(target) is not None


def test_publish_over_a_foreign_mount_is_refused(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    os.mkdir(target)
    host.add_mount("/dev/sdz1", target)
    with pytest.raises(FailedPrecondition):
        node.publish(v.id, staging, target, RW, False)
    assert ctx.store.publication(target) is None
    assert [m.source for m in host.mount_table if m.mount_point == os.path.normpath(target)] == [
        "/dev/sdz1"
    ]


def test_refused_stage_detaches_the_loop_it_attached(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    host.add_mount("/dev/sdz1", staging)  # something else already sits on the staging path
    with pytest.raises(FailedPrecondition):
        node.stage(v.id, staging, RW)
    assert host.loop_devices() == []
    assert ctx.store.staging(v.id) is None


def test_failed_growth_after_mount_unmounts_what_this_call_mounted(
    node: NodeCore,
    controller: ControllerCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v = make(controller, "xfs")

    def boom(*_a: object) -> None:
        raise Internal("could not read the filesystem's size")

    monkeypatch.setattr(ctx.fs, "size_bytes", boom)  # the growth check after mounting
    with pytest.raises(Internal):
        node.stage(
            v.id, staging, Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "xfs")
        )
    assert host.top(staging) is None and host.loop_devices() == []
    assert ctx.store.staging(v.id) is None


# --- hostile paths and sizes (found by tests/hardening/test_hostile.py) ---------------------------
def test_refused_stage_leaves_no_loop_and_no_directory(
    node: NodeCore, controller: ControllerCore, host: FakeHost, kubelet: str
) -> None:
    """A stage refused after the loop device was attached (read-only on an unformatted volume)
    used to leave the loop device and the staging directory behind."""
    v = make(controller)
    staging = os.path.join(kubelet, "never-made")
    with pytest.raises(FailedPrecondition, match="read-only"):
        node.stage(v.id, staging, RO)
    assert host.loop_devices() == []
    assert not os.path.exists(staging)
    assert node.ctx.store.staging(v.id) is None


def test_stage_on_foreign_mount_detaches_its_loop(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str
) -> None:
    v = make(controller)
    os.mkdir(staging)
    host.add_mount("/dev/sda1", staging)
    with pytest.raises(FailedPrecondition, match="another filesystem"):
        node.stage(v.id, staging, RW)
    assert host.loop_devices() == [] and os.path.isdir(staging)


@pytest.mark.parametrize(
    "make_path",
    [
        lambda kubelet, pool: os.path.join(kubelet, "link", "new"),  # symlinked parent
        lambda kubelet, pool: os.path.join(kubelet, "link"),  # the symlink itself
        lambda kubelet, pool: os.path.join(kubelet, "x", "..", "y"),
        lambda kubelet, pool: os.path.join(pool, "volumes"),
        lambda kubelet, pool: pool,
        lambda kubelet, pool: os.path.dirname(pool),  # an ancestor of the pool
    ],
    ids=["symlink-parent", "symlink", "dotdot", "in-pool", "pool", "pool-ancestor"],
)
def test_kubelet_paths_are_contained(
    node: NodeCore,
    controller: ControllerCore,
    host: FakeHost,
    kubelet: str,
    pool_dir: str,
    tmp_path: os.PathLike[str],
    make_path: object,
) -> None:
    outside = os.path.join(str(tmp_path), "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "data"), "w") as fh:
        fh.write("keep")
    os.symlink(outside, os.path.join(kubelet, "link"))
    path = make_path(kubelet, pool_dir)  # type: ignore[operator]
    v = make(controller)
    staging = os.path.join(kubelet, "staging")
    os.mkdir(staging)
    with pytest.raises(InvalidArgument):
        node.stage(v.id, path, RW)
    with pytest.raises(InvalidArgument):
        node.unstage(v.id, path)
    with pytest.raises(InvalidArgument):
        node.unpublish(v.id, path)
    node.stage(v.id, staging, RW)
    with pytest.raises(InvalidArgument):
        node.publish(v.id, staging, path, RW, False)
    assert sorted(os.listdir(outside)) == ["data"]
    assert [m.mount_point for m in host.mount_table] == [staging]


def test_publish_target_must_not_be_staging_or_foreign_mount(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str, target: str
) -> None:
    v = make(controller)
    node.stage(v.id, staging, RW)
    for bad in (staging, os.path.join(staging, "sub")):
        with pytest.raises(InvalidArgument):
            node.publish(v.id, staging, bad, RW, False)
    os.mkdir(target)
    host.add_mount("tmpfs", target, "tmpfs")
    with pytest.raises(FailedPrecondition, match="another filesystem"):
        node.publish(v.id, staging, target, RW, False)
    assert not host.runner.ran("umount") and len(host.mount_table) == 2


def test_unpublish_without_record_removes_nothing(
    node: NodeCore, controller: ControllerCore, kubelet: str
) -> None:
    v = make(controller)
    empty_dir, empty_file = os.path.join(kubelet, "d"), os.path.join(kubelet, "f")
    os.mkdir(empty_dir)
    open(empty_file, "w").close()
    node.unpublish(v.id, empty_dir)
    node.unpublish(v.id, empty_file)
    assert os.path.isdir(empty_dir) and os.path.isfile(empty_file)


def test_node_expand_checks_range_and_pool_before_growing(
    node: NodeCore, controller: ControllerCore, ctx: PoolContext, staging: str, target: str
) -> None:
    v = make(controller)
    node.publish(v.id, staging, target, RW, False)
    before = ctx.backend.volume_size(v.id)
    with pytest.raises(InvalidArgument):
        node.expand(v.id, target, CapacityRange(-1))
    with pytest.raises(InvalidArgument):
        node.expand(v.id, target, CapacityRange(2 * v.size, v.size))
    with pytest.raises(OutOfRange):
        node.expand(v.id, target, CapacityRange(0, MiB))  # would shrink
    with pytest.raises(OutOfRange):
        node.expand(v.id, target, CapacityRange(2**63 - 1))
    with pytest.raises(ResourceExhausted):
        node.expand(v.id, target, CapacityRange(1 << 60))
    assert ctx.backend.volume_size(v.id) == before
    assert ctx.store.get_volume(v.id).size == v.size  # type: ignore[union-attr]


def test_mount_group_error_counter_and_device_identity_go_through_the_host(
    node: NodeCore, controller: ControllerCore, host: FakeHost, staging: str, target: str
) -> None:
    """VOLUME_MOUNT_GROUP ownership, the kernel's error counter and block-device identity are
    the Host interface's: the fake sees every one of them."""
    v = make(controller)
    node.publish(v.id, staging, target, replace(RW, mount_group="2000"), False)
    assert host.groups_given == [(os.path.normpath(target), 2000)]
    assert not node.stats(v.id, target).condition.abnormal
    host.fs_error_counts[DEV] = 3
    cond = node.stats(v.id, target).condition
    assert cond.abnormal and "3 error(s)" in cond.message
    b = make(controller, "", AccessType.BLOCK, name="blk")
    block_target = os.path.join(os.path.dirname(target), "blk")
    node.publish(b.id, staging + "-b", block_target, BLOCK, False)
    device = node.ctx.store.staging(b.id).device  # type: ignore[union-attr]
    with pytest.raises(NotFound):  # the bind is there, but the host says it is not that device
        node.stats(b.id, block_target)
    host.block_devices[device] = host.block_devices[block_target] = 7 << 8 | 1
    assert node.stats(b.id, block_target).total_bytes > 0
