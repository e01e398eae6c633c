"""driver.storage.image.ImagePool on a plain tmp directory (no root, no loop devices)."""

from __future__ import annotations

import errno
import os
import time
from collections import namedtuple

import pytest

from driver import ids
from driver.errors import Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from driver.model import MiB
from driver.storage import image as image_mod
from driver.storage.image import ImagePool, _sparse_copy

V1 = "v-" + "1" * 32
V2 = "v-" + "2" * 32
S1 = "s-" + "1" * 32


@pytest.fixture
def pool(pool_dir: str) -> ImagePool:
    return ImagePool(pool_dir)


def _write_at(path: str, chunks: dict[int, bytes]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in chunks.items():
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_missing_root_is_unavailable(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(Unavailable):
        ImagePool(os.path.join(str(tmp_path), "nope"))


def test_layout(pool: ImagePool, pool_dir: str) -> None:
    root = os.path.realpath(pool_dir)
    assert pool.image_path(V1) == os.path.join(root, "volumes", V1 + ".img")
    assert pool.snapshot_path(S1) == os.path.join(root, "snapshots", S1 + ".img")
    for d in ("volumes", "snapshots", "trash"):
        assert os.path.isdir(os.path.join(root, d))
    assert pool.healthy()
    assert pool.owns(pool.image_path(V1))
    assert not pool.owns(pool.snapshot_path(S1))
    assert not pool.owns("/etc/" + V1 + ".img")


@pytest.mark.parametrize(
    "bad", ["../../etc", "/etc", "../v-" + "1" * 32, "", S1, "v-" + "1" * 32 + "/../x", "v-1"]
)
def test_image_path_refuses_non_volume_ids(pool: ImagePool, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        pool.image_path(bad)


@pytest.mark.parametrize("bad", ["../../etc", "/etc", V1, "s-../x"])
def test_snapshot_path_refuses_non_snapshot_ids(pool: ImagePool, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        pool.snapshot_path(bad)


def test_image_path_refuses_symlink_out_of_pool(
    pool: ImagePool, tmp_path: os.PathLike[str]
) -> None:
    outside = os.path.join(str(tmp_path), "outside.img")
    open(outside, "wb").close()
    os.symlink(outside, os.path.join(pool.root, "volumes", V1 + ".img"))
    with pytest.raises(Internal):
        pool.image_path(V1)


def test_create_is_sparse_and_sized(pool: ImagePool) -> None:
    pool.create(V1, 64 * MiB)
    st = os.stat(pool.image_path(V1))
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 < MiB  # sparse
    assert pool.volume_size(V1) == 64 * MiB
    assert not os.path.exists(pool.image_path(V1) + ".tmp")
    assert oct(st.st_mode & 0o777) == oct(0o600)


def test_create_preallocate_allocates(pool: ImagePool) -> None:
    pool.create(V1, 4 * MiB, preallocate=True)
    assert os.stat(pool.image_path(V1)).st_blocks * 512 >= 4 * MiB


def test_create_no_space_is_resource_exhausted(
    pool: ImagePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_mod.os, "ftruncate", full)
    with pytest.raises(ResourceExhausted):
        pool.create(V1, MiB)
    monkeypatch.undo()
    assert pool.volume_ids() == set()  # the temporary file was discarded
    assert os.listdir(os.path.join(pool.root, "volumes")) == []


def test_expand_grows_never_shrinks(pool: ImagePool) -> None:
    pool.create(V1, 8 * MiB)
    pool.expand(V1, 16 * MiB)
    assert pool.volume_size(V1) == 16 * MiB
    pool.expand(V1, 4 * MiB)
    assert pool.volume_size(V1) == 16 * MiB


def test_expand_missing_image_is_not_found(pool: ImagePool) -> None:
    with pytest.raises(NotFound):
        pool.expand(V1, MiB)
    assert pool.volume_size(V1) is None


def test_clone_snapshot_restore_preserve_bytes(pool: ImagePool) -> None:
    pool.create(V1, 8 * MiB)
    chunks = {0: b"head" * 1024, 3 * MiB + 17: b"middle", 8 * MiB - 5: b"tail!"}
    _write_at(pool.image_path(V1), chunks)
    original = _read(pool.image_path(V1))

    pool.snapshot(V1, S1)
    assert pool.snapshot_exists(S1)
    assert _read(pool.snapshot_path(S1)) == original

    pool.restore_snapshot(S1, V2, 12 * MiB)
    restored = _read(pool.image_path(V2))
    assert len(restored) == 12 * MiB
    assert restored[: 8 * MiB] == original and restored[8 * MiB :] == b"\0" * 4 * MiB

    v3 = ids.new_volume_id()
    pool.clone_volume(V1, v3, 8 * MiB)
    assert _read(pool.image_path(v3)) == original
    # copies are independent of their origin
    _write_at(pool.image_path(V1), {0: b"CHANGED"})
    assert _read(pool.image_path(v3))[:7] == b"headhea"


def test_copy_from_missing_source_is_not_found_and_leaves_nothing(pool: ImagePool) -> None:
    with pytest.raises(NotFound):
        pool.clone_volume(V1, V2, MiB)
    with pytest.raises(NotFound):
        pool.restore_snapshot(S1, V2, MiB)
    assert pool.volume_ids() == set()


def test_sparse_copy_preserves_bytes_and_holes(tmp_path: os.PathLike[str]) -> None:
    src, dst = os.path.join(str(tmp_path), "src"), os.path.join(str(tmp_path), "dst")
    size = 16 * MiB
    with open(src, "wb") as fh:
        fh.truncate(size)
    chunks = {0: b"A" * 4096, 5 * MiB: b"B" * 70000, 11 * MiB + 123: b"C" * 10, size - 3: b"END"}
    _write_at(src, chunks)
    with open(src, "rb") as s, open(dst, "wb") as d:
        _sparse_copy(s.fileno(), d.fileno())
    assert os.path.getsize(dst) == size
    assert _read(dst) == _read(src)
    st_src, st_dst = os.stat(src), os.stat(dst)
    assert st_dst.st_blocks <= st_src.st_blocks + 64  # holes stayed holes
    assert st_dst.st_blocks * 512 < MiB
    fd = os.open(dst, os.O_RDONLY)
    try:
        assert os.lseek(fd, 1 * MiB, os.SEEK_DATA) >= 4 * MiB  # hole between A and B
        assert os.lseek(fd, 0, os.SEEK_HOLE) < 5 * MiB
    finally:
        os.close(fd)


def test_sparse_copy_of_all_hole_file(tmp_path: os.PathLike[str]) -> None:
    src, dst = os.path.join(str(tmp_path), "src"), os.path.join(str(tmp_path), "dst")
    with open(src, "wb") as fh:
        fh.truncate(3 * MiB)
    with open(src, "rb") as s, open(dst, "wb") as d:
        _sparse_copy(s.fileno(), d.fileno())
    assert os.path.getsize(dst) == 3 * MiB
    assert os.stat(dst).st_blocks == 0


def test_delete_unlinks_image_and_leftover_without_trash(pool: ImagePool) -> None:
    """The record is gone before delete is called, so the image is unlinked outright (a crash
    that brings it back leaves an orphan for the sweep); a leftover temporary copy goes too."""
    pool.create(V1, MiB)
    path = pool.image_path(V1)
    with open(path + ".tmp", "wb") as fh:
        fh.truncate(MiB)
    pool.delete_volume(V1)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    trash = os.listdir(os.path.join(pool.root, "trash"))
    assert [n for n in trash if n.startswith("volume-")] == []
    pool.delete_volume(V1)  # idempotent


def test_create_makes_the_image_under_its_final_name_once(pool: ImagePool) -> None:
    pool.create(V1, 3 * MiB)
    path = pool.image_path(V1)
    assert os.path.getsize(path) == 3 * MiB and not os.path.exists(path + ".tmp")
    with pytest.raises(FileExistsError):
        pool.create(V1, MiB)  # never truncates an existing image
    assert os.path.getsize(path) == 3 * MiB


def test_delete_snapshot(pool: ImagePool) -> None:
    pool.create(V1, MiB)
    pool.snapshot(V1, S1)
    pool.delete_snapshot(S1)
    assert not pool.snapshot_exists(S1)
    assert pool.volume_size(V1) == MiB
    pool.delete_snapshot(S1)


def test_delete_also_reclaims_leftover_tmp(pool: ImagePool) -> None:
    pool.create(V1, MiB)
    open(pool.image_path(V1) + ".tmp", "wb").close()
    pool.delete_volume(V1)
    assert pool.volume_ids() == set()
    assert os.listdir(os.path.join(pool.root, "trash")) == []


def test_volume_ids_are_images_leftovers_are_tmp(pool: ImagePool) -> None:
    pool.create(V1, MiB)
    open(pool.image_path(V2) + ".tmp", "wb").close()
    open(os.path.join(pool.root, "volumes", "junk.img"), "wb").close()
    open(os.path.join(pool.root, "volumes", S1 + ".img"), "wb").close()
    assert pool.volume_ids() == {V1}
    assert pool.leftovers() == [pool.image_path(V2) + ".tmp"]
    open(pool.snapshot_path(S1) + ".tmp", "wb").close()
    assert pool.snapshot_ids() == set()


def test_trash_orphan_moves_tmp_only_image(pool: ImagePool) -> None:
    open(pool.image_path(V2) + ".tmp", "wb").close()
    moved = pool.trash_orphan("volume", V2)
    assert moved.startswith(os.path.join(pool.root, "trash", f"volume-{V2}-"))
    assert os.path.exists(moved)
    assert pool.volume_ids() == set()
    assert pool.trash_orphan("volume", V2) == ""


def test_empty_trash_respects_age(pool: ImagePool) -> None:
    trash = os.path.join(pool.root, "trash")
    old, new = os.path.join(trash, "old.img"), os.path.join(trash, "new.img")
    for p in (old, new):
        open(p, "wb").close()
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert pool.empty_trash(older_than=600) == 1
    assert sorted(os.listdir(trash)) == ["new.img"]


FakeVfs = namedtuple("FakeVfs", "f_blocks f_frsize f_bavail")


@pytest.mark.parametrize(
    ("reserved", "available"),
    [(0, 400 * 4096), (100 * 4096, 300 * 4096), (400 * 4096, 0), (10**15, 0)],
)
def test_usage_subtracts_reservation_never_negative(
    pool_dir: str, monkeypatch: pytest.MonkeyPatch, reserved: int, available: int
) -> None:
    p = ImagePool(pool_dir, reserved_bytes=reserved)
    monkeypatch.setattr(image_mod.os, "statvfs", lambda path: FakeVfs(1000, 4096, 400))
    u = p.usage()
    assert (u.total_bytes, u.available_bytes, u.reflink) == (1000 * 4096, available, p.reflink)


def test_usage_on_vanished_pool_is_unavailable(
    pool: ImagePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(path: str) -> None:
        raise FileNotFoundError(errno.ENOENT, "gone")

    monkeypatch.setattr(image_mod.os, "statvfs", gone)
    with pytest.raises(Unavailable):
        pool.usage()


def test_metadata_reserve_is_given_up_when_full_and_restored_after_delete(
    pool: ImagePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserve = os.path.join(pool.root, image_mod.META_RESERVE)
    assert os.path.getsize(reserve) == image_mod.META_RESERVE_BYTES
    pool.keep_metadata_room()  # plenty of room: kept
    assert os.path.exists(reserve)
    real = os.statvfs
    monkeypatch.setattr(image_mod.os, "statvfs", lambda path: FakeVfs(1000, 4096, 10))
    pool.keep_metadata_room()
    assert not os.path.exists(reserve)
    assert pool.ensure_reserve() is False  # no room to take it back yet
    monkeypatch.setattr(image_mod.os, "statvfs", real)
    pool.create(V1, MiB)
    pool.delete_volume(V1)
    assert os.path.getsize(reserve) == image_mod.META_RESERVE_BYTES
    assert pool.volume_ids() == set()  # the reserve is not a volume


def test_store_full_is_resource_exhausted_and_runs_before_write(
    tmp_path: os.PathLike[str],
) -> None:
    from driver.storage.store import Store
    from tests.unit.fakes import HookedConnection, sqlite_full

    calls: list[int] = []
    s = Store(os.path.join(str(tmp_path), "m.db"), before_write=lambda: calls.append(1))
    s.journal_begin("x", "y", {})
    assert calls == [1]

    def full_at_commit(sql: str) -> None:
        if sql == "COMMIT":
            raise sqlite_full()

    real = s._db
    s._db = HookedConnection(real, full_at_commit)  # type: ignore[assignment]
    with pytest.raises(ResourceExhausted, match="no room"):
        s.journal_begin("x", "z", {})
    assert calls == [1, 1]
    s._db = real
    assert [key for _, _, key, _ in s.journal()] == ["y"]  # rolled back, and the store works:
    s.journal_begin("x", "w", {})
    assert [key for _, _, key, _ in s.journal()] == ["y", "w"]
