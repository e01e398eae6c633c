"""The extent-diff module on real loop-mounted pools (root): XFS with reflink, btrfs (also with
compression), ext4 (no reflink: callers must fall back)."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator

import pytest

from driver import errors
from driver.backup import extents
from driver.backup.extents import Range
from tests.backup.pools import M
from tests.backup.pools import make_pool as _pool

pytestmark = pytest.mark.root


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_pool(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _pool(request.param)


@pytest.fixture
def zstd_pool() -> Iterator[str]:
    yield from _pool("btrfs-zstd")


@pytest.fixture
def ext4_pool() -> Iterator[str]:
    yield from _pool("ext4")


def write_at(path: str, writes: dict[int, bytes]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in writes.items():
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def covered(ranges: list[Range], lo: int, hi: int) -> bool:
    return any(r.offset <= lo and r.end >= hi for r in ranges)


def total(ranges: list[Range]) -> int:
    return sum(r.length for r in ranges)


def make_base(pool: str, size: int = 64 * M) -> tuple[str, list[int]]:
    """A sparse file with random data in every other MiB of its first half."""
    rng = random.Random(5)
    path = os.path.join(pool, "base.img")
    with open(path, "wb") as fh:
        fh.truncate(size)
    data_mibs = list(range(0, size // M // 2, 2))
    write_at(path, {i * M: rng.randbytes(M) for i in data_mibs})
    return path, data_mibs


def test_allocated_names_data_and_holes(reflink_pool: str) -> None:
    base, data_mibs = make_base(reflink_pool)
    alloc = extents.allocated(base)
    for i in data_mibs:
        assert covered(alloc, i * M, (i + 1) * M), i
    assert total(alloc) == len(data_mibs) * M  # holes are not allocated
    raw = extents.fiemap(base)
    assert raw and all(e.length > 0 for e in raw)
    assert raw == sorted(raw, key=lambda e: e.logical)


def test_changed_after_reflink_and_random_writes(reflink_pool: str) -> None:
    assert extents.shares_extents(reflink_pool)
    base, _ = make_base(reflink_pool)
    new = os.path.join(reflink_pool, "new.img")
    extents.reflink(base, new)
    assert extents.changed(base, new) == []  # a fresh reflink copy: nothing changed
    assert any(e.flags & extents.FIEMAP_EXTENT_SHARED for e in extents.fiemap(new))
    rng = random.Random(11)
    mibs = sorted(rng.sample(range(64), 6))
    write_at(new, {i * M: rng.randbytes(M) for i in mibs})
    delta = extents.changed(base, new)
    for i in mibs:
        assert covered(delta, i * M, (i + 1) * M), (i, delta)
    # small: exactly the written MiBs, nothing of the 32 MiB of unchanged data
    assert total(delta) == len(mibs) * M, delta
    # symmetric question, same answer
    assert extents.changed(new, base) == delta


def test_changed_sub_block_write_and_hole_punch(reflink_pool: str) -> None:
    base, data_mibs = make_base(reflink_pool)
    new = os.path.join(reflink_pool, "new.img")
    extents.reflink(base, new)
    write_at(new, {data_mibs[1] * M + 100: b"x"})  # one byte: its block is changed
    fd = os.open(new, os.O_RDWR)
    try:  # punch the third data MiB out
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert libc.fallocate(fd, punch, ctypes.c_long(data_mibs[2] * M), ctypes.c_long(M)) == 0
        os.fsync(fd)
    finally:
        os.close(fd)
    delta = extents.changed(base, new)
    assert covered(delta, data_mibs[1] * M + 100, data_mibs[1] * M + 101)
    assert covered(delta, data_mibs[2] * M, (data_mibs[2] + 1) * M)
    assert total(delta) <= M + 64 * 1024 + M


def test_changed_files_of_different_sizes(reflink_pool: str) -> None:
    base, _ = make_base(reflink_pool, 16 * M)
    new = os.path.join(reflink_pool, "new.img")
    extents.reflink(base, new)
    os.truncate(new, 24 * M)
    assert extents.changed(base, new) == []  # grown by a hole only: reads the same (zeros)
    write_at(new, {20 * M: os.urandom(M)})
    assert extents.changed(base, new) == [Range(20 * M, M)]
    os.truncate(new, 2 * M)  # shrunk: the data that was cut is changed
    delta = extents.changed(base, new)
    assert covered(delta, 2 * M, 3 * M)


def test_compressed_btrfs_extents_are_reported_changed(zstd_pool: str) -> None:
    """btrfs ENCODED (compressed) extents are never compared: a reflink copy with no write is
    still reported changed where it holds data (documented: correct, not incremental)."""
    path = os.path.join(zstd_pool, "c.img")
    with open(path, "wb") as fh:
        fh.write(b"compressible " * (4 * M // 13))
        fh.flush()
        os.fsync(fh.fileno())
    raw = extents.fiemap(path)
    assert any(e.flags & extents.FIEMAP_EXTENT_ENCODED for e in raw)
    new = os.path.join(zstd_pool, "c2.img")
    extents.reflink(path, new)
    delta = extents.changed(path, new)
    assert total(delta) >= total(extents.allocated(path)) > 0


def test_ext4_cannot_share_extents(ext4_pool: str) -> None:
    assert not extents.shares_extents(ext4_pool)
    a = os.path.join(ext4_pool, "a")
    with open(a, "wb") as fh:
        fh.write(os.urandom(M))
    with pytest.raises(extents.ExtentMapUnsupported):
        extents.reflink(a, os.path.join(ext4_pool, "b"))
    assert not os.path.exists(os.path.join(ext4_pool, "b"))


def test_errors(reflink_pool: str, tmp_path: object) -> None:
    with pytest.raises(errors.NotFound):
        extents.allocated(os.path.join(reflink_pool, "missing"))
    with pytest.raises(errors.NotFound):
        extents.changed(os.path.join(reflink_pool, "missing"), os.path.join(reflink_pool, "x"))
    base, _ = make_base(reflink_pool, 4 * M)
    other = os.path.join(str(tmp_path), "other.img")
    shutil.copyfile(base, other)
    with pytest.raises(extents.ExtentMapUnsupported, match="different filesystems"):
        extents.changed(base, other)
    with pytest.raises((errors.InvalidArgument, errors.Internal, extents.ExtentMapUnsupported)):
        extents.allocated(reflink_pool)  # a directory
