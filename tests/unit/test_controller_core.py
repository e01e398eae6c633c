"""driver.core.controller.ControllerCore on a real Store and ImagePool, fake host."""

from __future__ import annotations

import os

import pytest

from driver import TOPOLOGY_KEY, ids
from driver.core.controller import ControllerCore, expand_request
from driver.core.pool import PoolContext
from driver.core.sizing import DEFAULT_VOLUME_SIZE
from driver.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from driver.model import (
    AccessMode,
    AccessType,
    Capability,
    CapacityRange,
    ContentSource,
    MiB,
    PoolUsage,
    Publication,
    Staging,
)
from driver.storage.image import ImagePool
from driver.storage.store import Store
from tests.unit.conftest import NODE, build_ctx
from tests.unit.fakes import FakeHost, busy

RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
XFS = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, fs_type="xfs")
BLOCK = Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER)
HERE = {TOPOLOGY_KEY: NODE}


def create(c: ControllerCore, name: str = "pvc-1", size: int = 10 * MiB, **kw: object):
    kw.setdefault("caps", [RW])
    kw.setdefault("parameters", {})
    kw.setdefault("source", None)
    return c.create_volume(name, rng=CapacityRange(size), **kw)  # type: ignore[arg-type]


# --- CreateVolume ---------------------------------------------------------------------------------
def test_create_records_and_allocates(controller: ControllerCore, ctx: PoolContext) -> None:
    v = create(controller, parameters={"fsType": "ext4"})
    assert ids.is_volume_id(v.id)
    assert (v.name, v.size, v.access_type, v.fs_type, v.formatted) == (
        "pvc-1",
        10 * MiB,
        AccessType.MOUNT,
        "ext4",
        False,
    )
    assert v.sector_size == ctx.loop_sector_size
    assert ctx.store.get_volume(v.id) == v
    assert ctx.backend.volume_size(v.id) == 10 * MiB
    assert ctx.store.journal() == []
    assert not busy(ctx.locks, "name:pvc-1")


def test_create_is_idempotent(controller: ControllerCore, ctx: PoolContext) -> None:
    a = create(controller)
    b = create(controller)
    assert a == b
    c = controller.create_volume("pvc-1", [RW], CapacityRange(MiB, 20 * MiB), {}, None)
    assert c.id == a.id
    assert ctx.store.counts() == (1, 0)
    assert ctx.backend.volume_ids() == {a.id}


@pytest.mark.parametrize(
    ("rng", "caps", "params", "source"),
    [
        (CapacityRange(20 * MiB), [RW], {}, None),  # larger than the existing one
        (CapacityRange(0, 5 * MiB), [RW], {}, None),  # existing one above the limit
        (CapacityRange(10 * MiB), [XFS], {}, None),  # different filesystem
        (CapacityRange(10 * MiB), [BLOCK], {}, None),  # different access type
    ],
)
def test_create_same_name_incompatible_is_already_exists(
    controller: ControllerCore,
    rng: CapacityRange,
    caps: list[Capability],
    params: dict[str, str],
    source: ContentSource | None,
) -> None:
    create(controller)
    with pytest.raises(AlreadyExists):
        controller.create_volume("pvc-1", caps, rng, params, source)


def test_create_same_name_different_source_is_already_exists(controller: ControllerCore) -> None:
    src = create(controller, "src")
    create(controller)
    with pytest.raises(AlreadyExists):
        create(controller, source=ContentSource("volume", src.id))


def test_create_larger_than_pool_is_resource_exhausted(
    host: FakeHost, store: Store, pool_dir: str
) -> None:
    c = ControllerCore(build_ctx(host, store, ImagePool(pool_dir, reserved_bytes=1 << 62)))
    with pytest.raises(ResourceExhausted):
        create(c)
    assert store.counts() == (0, 0)
    assert c.ctx.backend.volume_ids() == set()
    assert store.journal() == []


def test_create_validates_before_anything(controller: ControllerCore, ctx: PoolContext) -> None:
    with pytest.raises(InvalidArgument):
        create(controller, name="")
    with pytest.raises(InvalidArgument):
        create(controller, name="x" * 129)
    with pytest.raises(InvalidArgument):
        create(controller, caps=[])
    with pytest.raises(InvalidArgument):
        create(controller, caps=[Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER)])
    with pytest.raises(InvalidArgument):
        create(controller, parameters={"unknown": "1"})
    with pytest.raises(OutOfRange):
        controller.create_volume("n", [XFS], CapacityRange(0, 10 * MiB), {}, None)
    assert ctx.store.counts() == (0, 0)


def test_create_block_volume(controller: ControllerCore) -> None:
    v = create(controller, caps=[BLOCK], parameters={"fsType": "xfs"})
    assert (v.access_type, v.fs_type) == (AccessType.BLOCK, None)


def test_create_default_size(controller: ControllerCore) -> None:
    v = controller.create_volume("d", [RW], CapacityRange(), {}, None)
    assert v.size == DEFAULT_VOLUME_SIZE


def test_accessibility_requirements(controller: ControllerCore, ctx: PoolContext) -> None:
    other = {TOPOLOGY_KEY: "node-b"}
    with pytest.raises(ResourceExhausted):
        create(controller, "a", requisite=[other])
    with pytest.raises(ResourceExhausted):
        create(controller, "b", requisite=[other], preferred=[other])
    with pytest.raises(ResourceExhausted):  # same node, extra key: not our segment
        create(controller, "c", requisite=[{TOPOLOGY_KEY: NODE, "zone": "z"}])
    with pytest.raises(ResourceExhausted):
        create(controller, "d", requisite=[{"kubernetes.io/hostname": NODE}])
    assert ctx.store.counts() == (0, 0)
    assert create(controller, "e", requisite=[other, HERE]).name == "e"
    assert create(controller, "f", preferred=[HERE]).name == "f"


def test_create_on_unhealthy_pool_is_unavailable(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    os.rmdir(os.path.join(ctx.backend.root, "snapshots"))  # type: ignore[attr-defined]
    with pytest.raises(Unavailable):
        create(controller)


def test_create_name_busy_is_aborted(controller: ControllerCore, ctx: PoolContext) -> None:
    with ctx.locks.hold("name:pvc-1"), pytest.raises(Aborted):
        create(controller)


# --- content sources ------------------------------------------------------------------------------
def test_restore_from_snapshot_uses_source_size_as_floor(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    src = create(controller, "src", 10 * MiB)
    ctx.store.set_formatted(src.id, "ext4")
    snap = controller.create_snapshot("snap", src.id, {})
    v = controller.create_volume(
        "r", [RW], CapacityRange(MiB), {}, ContentSource("snapshot", snap.id)
    )
    assert v.size == 10 * MiB
    assert v.formatted and v.fs_type == "ext4"
    assert v.source == ContentSource("snapshot", snap.id)
    assert ctx.backend.volume_size(v.id) == 10 * MiB
    bigger = controller.create_volume(
        "r2", [RW], CapacityRange(30 * MiB), {}, ContentSource("snapshot", snap.id)
    )
    assert ctx.backend.volume_size(bigger.id) == bigger.size == 30 * MiB


def test_restore_limit_below_source_is_out_of_range(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    src = create(controller, "src", 10 * MiB)
    snap = controller.create_snapshot("snap", src.id, {})
    with pytest.raises(OutOfRange):
        controller.create_volume(
            "r", [RW], CapacityRange(0, 5 * MiB), {}, ContentSource("snapshot", snap.id)
        )
    with pytest.raises(OutOfRange):
        controller.create_volume(
            "c", [RW], CapacityRange(0, 5 * MiB), {}, ContentSource("volume", src.id)
        )
    assert ctx.store.counts() == (1, 1)


def test_clone_volume_copies_bytes(controller: ControllerCore, ctx: PoolContext) -> None:
    src = create(controller, "src", 4 * MiB)
    with open(ctx.backend.image_path(src.id), "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"payload")
    v = controller.create_volume("c", [RW], CapacityRange(), {}, ContentSource("volume", src.id))
    assert v.size == DEFAULT_VOLUME_SIZE  # required 0 → default, above the source's size
    with open(ctx.backend.image_path(v.id), "rb") as fh:
        fh.seek(MiB)
        assert fh.read(7) == b"payload"
    assert not busy(ctx.locks, src.id)


@pytest.mark.parametrize(
    "source",
    [
        ContentSource("snapshot", "s-" + "e" * 32),
        ContentSource("volume", "v-" + "e" * 32),
        ContentSource("snapshot", "../../etc"),
        ContentSource("volume", "/etc"),
    ],
)
def test_missing_or_malformed_source_is_not_found(
    controller: ControllerCore, ctx: PoolContext, source: ContentSource
) -> None:
    with pytest.raises(NotFound):
        create(controller, source=source)
    assert ctx.store.counts() == (0, 0)
    assert ctx.backend.volume_ids() == set()


def test_source_of_other_access_type_or_fs_is_invalid(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    blk = create(controller, "blk", caps=[BLOCK])
    with pytest.raises(InvalidArgument):
        create(controller, "m", source=ContentSource("volume", blk.id))
    ext = create(controller, "ext")
    ctx.store.set_formatted(ext.id, "ext4")
    with pytest.raises(InvalidArgument):
        create(controller, "x", caps=[XFS], source=ContentSource("volume", ext.id))


# --- DeleteVolume ---------------------------------------------------------------------------------
def test_delete_volume(controller: ControllerCore, ctx: PoolContext) -> None:
    v = create(controller)
    controller.delete_volume(v.id)
    assert ctx.store.get_volume(v.id) is None
    assert ctx.backend.volume_size(v.id) is None
    assert ctx.store.journal() == []
    controller.delete_volume(v.id)  # idempotent


@pytest.mark.parametrize("vid", ["v-" + "9" * 32, "../../etc", "/etc", "pvc-123", "s-" + "9" * 32])
def test_delete_unknown_or_malformed_is_ok_and_touches_nothing(
    controller: ControllerCore, ctx: PoolContext, vid: str
) -> None:
    keep = create(controller)
    controller.delete_volume(vid)
    assert ctx.store.get_volume(keep.id) == keep
    assert ctx.backend.volume_size(keep.id) == keep.size


def test_delete_empty_id_is_invalid(controller: ControllerCore) -> None:
    with pytest.raises(InvalidArgument):
        controller.delete_volume("")


def test_delete_while_staged_or_published_is_failed_precondition(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = create(controller)
    ctx.store.put_staging(
        Staging(v.id, "/k/s", "/dev/loop900", AccessType.MOUNT, "ext4", False, ())
    )
    with pytest.raises(FailedPrecondition):
        controller.delete_volume(v.id)
    ctx.store.remove_staging(v.id)
    ctx.store.put_publication(Publication(v.id, "/k/t", False, AccessMode.SINGLE_NODE_WRITER))
    with pytest.raises(FailedPrecondition):
        controller.delete_volume(v.id)
    assert ctx.backend.volume_size(v.id) == v.size
    ctx.store.remove_publication("/k/t")
    controller.delete_volume(v.id)


def test_delete_busy_is_aborted(controller: ControllerCore, ctx: PoolContext) -> None:
    v = create(controller)
    with ctx.locks.hold(v.id), pytest.raises(Aborted):
        controller.delete_volume(v.id)
    assert ctx.store.get_volume(v.id) is not None


# --- ListVolumes ----------------------------------------------------------------------------------
def test_list_volumes_paginates(controller: ControllerCore) -> None:
    made = sorted(create(controller, f"p{i}", MiB).id for i in range(5))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = controller.list_volumes(2, token)
        assert len(page.items) <= 2
        seen += [s.volume.id for s in page.items]
        pages += 1
        token = page.next_token
        if not token:
            break
    assert seen == made and pages == 3
    full = controller.list_volumes(0, "")
    assert [s.volume.id for s in full.items] == made and full.next_token == ""
    exact = controller.list_volumes(5, "")
    assert len(exact.items) == 5 and exact.next_token == ""


def test_list_volumes_bad_token_and_negative_max(controller: ControllerCore) -> None:
    with pytest.raises(Aborted):
        controller.list_volumes(1, "garbage")
    with pytest.raises(Aborted):
        controller.list_volumes(1, "s-" + "0" * 32)
    with pytest.raises(InvalidArgument):
        controller.list_volumes(-1, "")


def test_volume_condition(controller: ControllerCore, ctx: PoolContext) -> None:
    v = create(controller)
    assert controller.volume_status(v.id).condition.abnormal is False
    os.truncate(ctx.backend.image_path(v.id), MiB)
    assert controller.volume_status(v.id).condition.abnormal is True
    os.unlink(ctx.backend.image_path(v.id))
    assert controller.volume_status(v.id).condition.abnormal is True
    with pytest.raises(NotFound):
        controller.volume_status("v-" + "0" * 32)


# --- snapshots ------------------------------------------------------------------------------------
def test_snapshot_create_idempotent_and_name_reuse(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    a = create(controller, "a")
    b = create(controller, "b")
    s = controller.create_snapshot("snap", a.id, {})
    assert (s.source_volume_id, s.size, s.access_type) == (a.id, a.size, AccessType.MOUNT)
    assert ctx.backend.snapshot_exists(s.id)  # type: ignore[attr-defined]
    assert controller.create_snapshot("snap", a.id, {}) == s
    with pytest.raises(AlreadyExists):
        controller.create_snapshot("snap", b.id, {})
    assert ctx.store.counts() == (2, 1)


def test_snapshot_errors(controller: ControllerCore) -> None:
    a = create(controller, "a")
    with pytest.raises(InvalidArgument):
        controller.create_snapshot("", a.id, {})
    with pytest.raises(InvalidArgument):
        controller.create_snapshot("s", "", {})
    with pytest.raises(InvalidArgument):
        controller.create_snapshot("s", a.id, {"x": "y"})
    with pytest.raises(NotFound):
        controller.create_snapshot("s", "v-" + "0" * 32, {})
    with pytest.raises(NotFound):
        controller.create_snapshot("s", "../../etc", {})


def test_snapshot_of_staged_volume_is_frozen_around_copy(
    controller: ControllerCore, ctx: PoolContext, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = create(controller)
    ctx.store.put_staging(
        Staging(v.id, "/k/staging", "/dev/loop900", AccessType.MOUNT, "ext4", False, ())
    )
    host.add_mount("/dev/loop900", "/k/staging")
    events = ctx.fs.events  # type: ignore[attr-defined]
    real = ctx.backend.snapshot

    def spy(vid: str, sid: str, **kw: object) -> None:
        events.append(("copy", vid))
        real(vid, sid, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx.backend, "snapshot", spy)
    controller.create_snapshot("snap", v.id, {})
    assert events == [("freeze", "/k/staging"), ("copy", v.id), ("thaw", "/k/staging")]


def test_snapshot_of_unstaged_volume_is_not_frozen(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = create(controller)
    controller.create_snapshot("snap", v.id, {})
    assert ctx.fs.events == []  # type: ignore[attr-defined]


def test_delete_and_list_snapshots(controller: ControllerCore, ctx: PoolContext) -> None:
    a = create(controller, "a")
    b = create(controller, "b")
    snaps = sorted(
        [controller.create_snapshot(f"s{i}", (a if i % 2 else b).id, {}).id for i in range(5)]
    )
    page = controller.list_snapshots(2, "", "", "")
    assert [s.id for s in page.items] == snaps[:2] and page.next_token == snaps[1]
    page = controller.list_snapshots(2, page.next_token, "", "")
    assert [s.id for s in page.items] == snaps[2:4]
    assert [s.id for s in controller.list_snapshots(0, "", snaps[0], "").items] == [snaps[0]]
    assert controller.list_snapshots(0, "", "s-" + "0" * 32, "").items == []
    assert controller.list_snapshots(0, "", "junk", "").items == []
    assert controller.list_snapshots(0, "", "", "junk").items == []
    only_a = controller.list_snapshots(0, "", "", a.id).items
    assert {s.source_volume_id for s in only_a} == {a.id} and len(only_a) == 2
    assert len(controller.list_snapshots(0, "", "", b.id).items) == 3
    with pytest.raises(Aborted):
        controller.list_snapshots(1, "v-" + "0" * 32, "", "")
    controller.delete_snapshot(snaps[0])
    controller.delete_snapshot(snaps[0])
    controller.delete_snapshot("../../etc")
    with pytest.raises(InvalidArgument):
        controller.delete_snapshot("")
    assert ctx.store.get_snapshot(snaps[0]) is None
    assert not ctx.backend.snapshot_exists(snaps[0])  # type: ignore[attr-defined]
    with pytest.raises(NotFound):
        controller.get_snapshot(snaps[0])


# --- expansion, capacity, validation --------------------------------------------------------------
def test_expand_request_is_answered_from_the_request_alone() -> None:
    """ControllerExpandVolume reads no pool: the rounded size, whatever the volume."""
    unknown = "v-" + "0" * 32
    assert expand_request(unknown, CapacityRange(20 * MiB), None) == 20 * MiB
    assert expand_request(unknown, CapacityRange(20 * MiB + 1), RW) == 21 * MiB
    assert expand_request(unknown, CapacityRange(MiB), XFS) == 300 * MiB  # the xfs minimum
    assert expand_request(unknown, CapacityRange(5 * MiB), BLOCK) == 5 * MiB
    with pytest.raises(InvalidArgument):
        expand_request(unknown, None, None)
    with pytest.raises(InvalidArgument):
        expand_request(unknown, CapacityRange(), None)
    with pytest.raises(InvalidArgument):  # required above limit
        expand_request(unknown, CapacityRange(20 * MiB, 10 * MiB), None)
    with pytest.raises(OutOfRange):  # no MiB or 4 KiB size fits between required and limit
        expand_request(unknown, CapacityRange(MiB + 1, MiB + 2), None)
    with pytest.raises(InvalidArgument):
        expand_request(
            unknown,
            CapacityRange(MiB),
            Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER),
        )
    with pytest.raises(InvalidArgument):
        expand_request("", CapacityRange(MiB), None)
    with pytest.raises(NotFound):
        expand_request("../etc", CapacityRange(MiB), None)


def test_capacity(controller: ControllerCore, ctx: PoolContext) -> None:
    avail = ctx.backend.usage().available_bytes
    got = controller.capacity([RW], HERE)
    assert abs(got[0] - avail) < 64 * MiB and got[0] == got[1]
    assert controller.capacity([RW], {TOPOLOGY_KEY: "node-b"}) == (0, 0)
    assert controller.capacity(
        [Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER)], None
    ) == (0, 0)


def test_validate_capabilities(controller: ControllerCore, ctx: PoolContext) -> None:
    v = create(controller)
    assert controller.validate_capabilities(v.id, [RW], {}) == ""
    assert controller.validate_capabilities(v.id, [BLOCK], {}) != ""
    assert (
        controller.validate_capabilities(
            v.id, [Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_READER_ONLY)], {}
        )
        != ""
    )
    ctx.store.set_formatted(v.id, "ext4")
    assert controller.validate_capabilities(v.id, [XFS], {}) != ""
    with pytest.raises(InvalidArgument):
        controller.validate_capabilities(v.id, [], {})
    with pytest.raises(NotFound):
        controller.validate_capabilities("v-" + "0" * 32, [RW], {})


def _write(ctx: PoolContext, volume_id: str, nbytes: int) -> None:
    with open(ctx.backend.image_path(volume_id), "r+b") as fh:
        fh.write(os.urandom(nbytes))
        fh.flush()
        os.fsync(fh.fileno())


def test_copies_need_room_for_the_source_data_to_diverge(
    controller: ControllerCore, ctx: PoolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = create(controller)
    _write(ctx, v.id, 2 * MiB)
    real = ctx.backend.usage()
    tight = PoolUsage(real.total_bytes, MiB, real.reflink, MiB)
    monkeypatch.setattr(ctx.backend, "usage", lambda: tight)
    with pytest.raises(ResourceExhausted, match="too little to keep a copy"):
        controller.create_snapshot("s", v.id, {})
    with pytest.raises(ResourceExhausted):
        controller.create_volume("c", [RW], CapacityRange(MiB), {}, ContentSource("volume", v.id))
    assert ctx.backend.snapshot_ids() == set() and ctx.backend.volume_ids() == {v.id}
    assert ctx.store.journal() == []
    monkeypatch.setattr(ctx.backend, "usage", lambda: real)
    assert controller.create_snapshot("s", v.id, {}).source_volume_id == v.id


def test_thin_volume_on_a_full_pool_is_abnormal(
    controller: ControllerCore, ctx: PoolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = create(controller)
    assert not controller.condition(v).abnormal
    real = ctx.backend.usage()
    monkeypatch.setattr(
        ctx.backend, "usage", lambda: PoolUsage(real.total_bytes, 0, real.reflink, 4096)
    )
    cond = controller.condition(v)
    assert cond.abnormal and "pool is full" in cond.message
