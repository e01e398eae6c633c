"""driver.core.check (stowagectl check): each kind of disagreement is reported, a clean pool is
not, and nothing is changed by looking."""

from __future__ import annotations

import os
import time

import pytest

from driver.core.check import inspect
from driver.core.controller import ControllerCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.ctl import local
from driver.model import AccessMode, AccessType, Capability, CapacityRange, MiB, Publication
from driver.storage.image import ImagePool
from driver.storage.store import Store
from tests.unit.conftest import build_ctx
from tests.unit.fakes import FakeHost

RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def _inspect(ctx: PoolContext) -> list[str]:
    return inspect(ctx.store, ctx.backend, ctx.loops, ctx.host).problems


@pytest.fixture
def staged(controller: ControllerCore, ctx: PoolContext, kubelet: str) -> tuple[str, str, str]:
    v = controller.create_volume("v", [RW], CapacityRange(MiB), {}, None)
    staging, target = os.path.join(kubelet, "s"), os.path.join(kubelet, "t")
    os.mkdir(staging)
    node = NodeCore(ctx)
    node.stage(v.id, staging, RW)
    node.publish(v.id, staging, target, RW, False)
    return v.id, staging, target


def test_consistent_pool_has_no_problems(ctx: PoolContext, staged: tuple[str, str, str]) -> None:
    found = inspect(ctx.store, ctx.backend, ctx.loops, ctx.host)
    assert found.ok, found.problems
    assert any("1 volume(s)" in n for n in found.notes)


def test_missing_image_and_orphans_and_leftovers(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = controller.create_volume("gone", [RW], CapacityRange(MiB), {}, None)
    os.unlink(ctx.backend.image_path(v.id))
    orphan = "v-" + "4" * 32
    ctx.backend.create(orphan, MiB)
    open(ctx.backend.image_path("v-" + "5" * 32) + ".tmp", "wb").close()
    ctx.store.journal_begin("create-volume", "v-" + "6" * 32, {"name": "x"})
    problems = "\n".join(_inspect(ctx))
    assert f"volume {v.id}" in problems and "image is missing" in problems
    assert f"volume image {orphan} has no row and no record" in problems
    assert ".tmp was left" in problems
    assert "was interrupted" in problems


def test_second_loop_on_one_image_is_reported(
    ctx: PoolContext, host: FakeHost, staged: tuple[str, str, str]
) -> None:
    vid = staged[0]
    host.add_loop(ctx.backend.image_path(vid))
    assert any("attached to 2 loop devices" in p for p in _inspect(ctx))


def test_mount_without_record_and_record_without_mount(
    ctx: PoolContext, host: FakeHost, staged: tuple[str, str, str], kubelet: str
) -> None:
    _vid, _staging, target = staged
    host.mount_table = [m for m in host.mount_table if m.mount_point != os.path.normpath(target)]
    stray = os.path.join(kubelet, "stray")
    host.add_mount("/dev/loop900", stray)
    problems = "\n".join(_inspect(ctx))
    assert f"recorded as published at {target}" in problems
    assert f"mounted at {stray} with no record" in problems


def test_stacked_mount_of_our_device_is_reported(
    ctx: PoolContext, host: FakeHost, staged: tuple[str, str, str]
) -> None:
    _vid, _staging, target = staged
    host.add_mount("/dev/loop900", target)
    assert any("more than once" in p for p in _inspect(ctx))


def test_publication_of_unknown_volume(ctx: PoolContext) -> None:
    ctx.store.put_publication(
        Publication("v-" + "7" * 32, "/k/t", False, AccessMode.SINGLE_NODE_WRITER)
    )
    assert any("publication of unknown volume" in p for p in _inspect(ctx))


def test_check_opens_read_only_and_changes_nothing(
    tmp_path: os.PathLike[str], host: FakeHost, ctx: PoolContext
) -> None:
    pool = os.path.join(str(tmp_path), "p")
    os.mkdir(pool)
    with pytest.raises(local.CannotCheck, match="not a Stowage pool"):
        local.check(pool, host, ctx.loops)  # no meta.db: reported, not created
    assert local.check_main(pool, "table", host, ctx.loops) == 2  # could not check
    assert os.listdir(pool) == []
    Store(os.path.join(pool, "meta.db")).close()
    ImagePool(pool)

    def listing() -> list[str]:  # SQLite's WAL side files come and go with any reader
        return sorted(n for n in os.listdir(pool) if not n.endswith(("-wal", "-shm")))

    before = listing()
    ro = Store(os.path.join(pool, "meta.db"), readonly=True)
    with pytest.raises(Exception, match=r"readonly|read-only|failed"):
        ro.journal_begin("x", "y", {})
    ro.close()
    assert listing() == before


def test_gc_respects_age_from_the_trash_stamp_not_mtime(tmp_path: os.PathLike[str]) -> None:
    """An image last written a year ago and deleted now is young trash, not old."""
    pool = os.path.join(str(tmp_path), "p")
    os.mkdir(pool)
    backend = ImagePool(pool)
    Store(os.path.join(pool, "meta.db")).close()
    vid = "v-" + "8" * 32
    backend.create(vid, MiB)
    year_ago = time.time() - 365 * 86400
    os.utime(backend.image_path(vid), (year_ago, year_ago))
    backend.trash_orphan("volume", vid)
    assert backend.empty_trash(older_than=3600) == 0
    assert len(backend.trash()) == 1
    assert local.gc_main(pool, 0, dry_run=True) == 0
    assert len(backend.trash()) == 1
    assert local.gc_main(pool, 0, dry_run=False) == 0
    assert backend.trash() == []


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800)]
)
def test_duration(text: str, seconds: float) -> None:
    assert local.duration(text) == seconds


def test_bad_duration() -> None:
    with pytest.raises(ValueError):
        local.duration("soon")


def test_check_exit_codes_and_gc_spares_claimed_trash(
    host: FakeHost, pool_dir: str
) -> None:
    """check: 0 consistent, 1 problems, 2 could not check; gc never reclaims an image a row or
    its own record claims, whatever its age."""
    store = Store(os.path.join(pool_dir, "meta.db"))  # check reads <pool>/meta.db
    ctx = build_ctx(host, store, ImagePool(pool_dir))
    controller = ControllerCore(ctx)
    assert local.check_main(pool_dir, "table", host, ctx.loops) == 0
    v = controller.create_volume("kept", [RW], CapacityRange(MiB), {}, None)
    assert local.check_main(pool_dir, "table", host, ctx.loops) == 0
    moved = ctx.backend.trash_orphan("volume", v.id)  # by hand: a described image in trash
    assert local.check_main(pool_dir, "table", host, ctx.loops) == 1
    assert local.gc_main(pool_dir, 0, dry_run=False) == 0
    assert os.path.exists(moved), "gc reclaimed an image its row and record claim"
    assert ctx.backend.empty_trash(0, claimed=()) == 0  # the record alone protects it
    store.close()  # the driver stops; its WAL is checkpointed into meta.db
    with open(os.path.join(pool_dir, "meta.db"), "r+b") as fh:
        fh.write(b"garbage" * 100)
    assert local.check_main(pool_dir, "table", host, ctx.loops) == 2
    assert local.gc_main(pool_dir, 0, dry_run=False) == 2
    assert os.path.exists(moved)
