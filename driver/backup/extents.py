"""Extent maps of files (FIEMAP) and the ranges where two reflink copies may differ.

One module, two consumers: incremental backups (read only what changed since the last uploaded
base) and, later, the CSI SnapshotMetadata service (GetMetadataAllocated / GetMetadataDelta).
Nothing here reads file data: answers come from the extent maps alone, in O(extents).

How `changed(base, new)` decides. Two reflink copies of a file share physical extents until one
of them is written; a write allocates a new extent (copy on write), so a logical range whose
physical address is the same in both maps holds the same bytes. A range is *unchanged* when, in
both files, it is either

* a hole or an unwritten (preallocated) extent — both read as zeros — or
* a plain data extent at the same physical address (same physical-minus-logical offset).

Everything else is reported as changed (a superset of the truly changed bytes, never a subset).
Extents whose physical address says nothing about their content are always treated as changed,
never compared: ``ENCODED`` (btrfs compressed: the address is the compressed extent's, and parts
of it may be referenced at different logical offsets), ``DATA_INLINE`` / ``DATA_TAIL`` (stored in
metadata), ``UNKNOWN`` / ``DELALLOC`` (no address yet; we sync first, so rare) and
``NOT_ALIGNED``. On a btrfs pool with compression this degrades to "read those ranges", never to a
wrong answer.

Bytes past a file's end read as zeros for the comparison, so files of different sizes compare
naturally: the tail of the longer file is changed where it holds data.

A pool that cannot share extents (ext4: no reflink) gives two copies different physical
addresses everywhere, so `changed()` would name every allocated byte: callers ask
`shares_extents(dir)` first and fall back to read-and-hash where it is False.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import struct
import tempfile
from dataclasses import dataclass

from driver import errors

# <linux/fiemap.h> and <linux/fs.h>
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FIEMAP_FLAG_SYNC = 0x00000001

FIEMAP_EXTENT_LAST = 0x00000001
FIEMAP_EXTENT_UNKNOWN = 0x00000002
FIEMAP_EXTENT_DELALLOC = 0x00000004
FIEMAP_EXTENT_ENCODED = 0x00000008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x00000080
FIEMAP_EXTENT_NOT_ALIGNED = 0x00000100
FIEMAP_EXTENT_DATA_INLINE = 0x00000200
FIEMAP_EXTENT_DATA_TAIL = 0x00000400
FIEMAP_EXTENT_UNWRITTEN = 0x00000800
FIEMAP_EXTENT_MERGED = 0x00001000
FIEMAP_EXTENT_SHARED = 0x00002000

#: Extents whose physical address cannot be compared: always reported as changed.
OPAQUE_FLAGS = (
    FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
)

_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, res64[2], flags, res32[3]
_BATCH = 1024
_FIEMAP_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent: bytes [logical, logical + length) of the file at `physical` on disk."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def opaque(self) -> bool:
        """True when the physical address says nothing comparable about the content."""
        return bool(self.flags & OPAQUE_FLAGS)

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


@dataclass(frozen=True)
class Range:
    """A half-open byte range [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class ExtentMapUnsupported(errors.FailedPrecondition):
    """The filesystem cannot report extent maps (FIEMAP): callers fall back to reading."""


def fiemap_fd(fd: int, sync: bool = True) -> list[Extent]:
    """Every extent of an open file, in logical order. `sync` flushes delayed allocation first
    (fsync and FIEMAP_FLAG_SYNC) so that recent writes have physical addresses."""
    if sync:
        os.fsync(fd)
    flags = FIEMAP_FLAG_SYNC if sync else 0
    out: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, _FIEMAP_MAX - start, flags, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise ExtentMapUnsupported(
                    f"this filesystem does not report extent maps (FIEMAP): {exc.strerror}"
                ) from exc
            raise errors.Internal(f"FIEMAP failed: {exc.strerror}") from exc
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, fl, _, _, _ = _EXTENT.unpack_from(
                buf, _HEADER.size + i * _EXTENT.size
            )
            out.append(Extent(logical, physical, length, fl))
            last = last or bool(fl & FIEMAP_EXTENT_LAST)
        if last:
            return out
        start = out[-1].end


def fiemap(path: str, sync: bool = True) -> list[Extent]:
    """Every extent of the file at `path` (see `fiemap_fd`)."""
    fd = _open(path)
    try:
        return fiemap_fd(fd, sync)
    finally:
        os.close(fd)


def _open(path: str) -> int:
    try:
        # O_RDWR is not needed for fsync on Linux; read-only works on snapshots too.
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise errors.NotFound(f"no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise errors.InvalidArgument(f"not a regular file: {path}") from exc
    except OSError as exc:
        raise errors.Internal(f"cannot open {path}: {exc.strerror}") from exc


def merge(ranges: list[Range]) -> list[Range]:
    """Sorted, non-overlapping, non-adjacent ranges covering the same bytes."""
    out: list[Range] = []
    for r in sorted((r for r in ranges if r.length > 0), key=lambda r: r.offset):
        if out and r.offset <= out[-1].end:
            last = out[-1]
            out[-1] = Range(last.offset, max(last.end, r.end) - last.offset)
        else:
            out.append(r)
    return out


def _clip(extents: list[Extent], size: int) -> list[Extent]:
    """Extents cut at the file size (FIEMAP may report a block-rounded tail)."""
    out = []
    for e in extents:
        if e.logical >= size:
            continue
        out.append(Extent(e.logical, e.physical, size - e.logical, e.flags) if e.end > size else e)
    return out


def allocated_extents(extents: list[Extent], size: int) -> list[Range]:
    """The logical ranges of `extents` that may hold non-zero data (unwritten extents read as
    zeros and are left out), merged, clipped to `size`."""
    return merge([Range(e.logical, e.length) for e in _clip(extents, size) if not e.unwritten])


def allocated(path: str) -> list[Range]:
    """Merged logical ranges of `path` that hold data; everything else reads as zeros."""
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        return allocated_extents(fiemap_fd(fd), size)
    finally:
        os.close(fd)


def _state_at(extents: list[Extent], i: int, pos: int) -> tuple[int, tuple[int, int] | None]:
    """Advance index `i` past extents ending at or before `pos`; the state of byte `pos`:
    None for zeros (hole, unwritten), (flags, physical address of `pos`) for data."""
    while i < len(extents) and extents[i].end <= pos:
        i += 1
    if i < len(extents) and extents[i].logical <= pos:
        e = extents[i]
        if e.unwritten and not e.opaque:
            return i, None
        return i, (e.flags, e.physical + (pos - e.logical))
    return i, None


def diff_extents(
    base: list[Extent], base_size: int, new: list[Extent], new_size: int
) -> list[Range]:
    """Ranges of [0, max(sizes)) where the two extent maps do not prove equal content."""
    base = _clip(base, base_size)
    new = _clip(new, new_size)
    end = max(base_size, new_size)
    cuts = {0, end}
    for e in (*base, *new):
        cuts.add(e.logical)
        cuts.add(min(e.end, end))
    points = sorted(c for c in cuts if 0 <= c <= end)
    changed: list[Range] = []
    bi = ni = 0
    for lo, hi in itertools.pairwise(points):
        bi, b = _state_at(base, bi, lo)
        ni, n = _state_at(new, ni, lo)
        if b is None and n is None:
            continue
        if b is not None and n is not None and b[1] == n[1] and not (b[0] | n[0]) & OPAQUE_FLAGS:
            continue
        changed.append(Range(lo, hi - lo))
    return merge(changed)


def changed(base_path: str, new_path: str) -> list[Range]:
    """Logical ranges of `new_path` whose content may differ from `base_path`, from the two extent
    maps alone (no data is read). Both files must be on the same filesystem, else nothing can be
    proven equal and ExtentMapUnsupported is raised (callers read and hash instead)."""
    bfd = _open(base_path)
    try:
        nfd = _open(new_path)
        try:
            bst, nst = os.fstat(bfd), os.fstat(nfd)
            if bst.st_dev != nst.st_dev:
                raise ExtentMapUnsupported(
                    f"{base_path} and {new_path} are on different filesystems: extent maps "
                    "cannot be compared"
                )
            return diff_extents(fiemap_fd(bfd), bst.st_size, fiemap_fd(nfd), nst.st_size)
        finally:
            os.close(nfd)
    finally:
        os.close(bfd)


def reflink(src: str, dst: str) -> None:
    """`dst` becomes a reflink copy of `src` (FICLONE): shares every extent, copies no data."""
    sfd = _open(src)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
        except OSError as exc:
            os.close(dfd)
            os.unlink(dst)
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ENOTTY):
                raise ExtentMapUnsupported(
                    f"cannot reflink {src} to {dst}: {exc.strerror}"
                ) from exc
            raise errors.Internal(f"FICLONE {src} -> {dst} failed: {exc.strerror}") from exc
        os.close(dfd)
    finally:
        os.close(sfd)


def shares_extents(directory: str) -> bool:
    """True when files in `directory` can share extents (reflink works there), so `changed()`
    names only what was written since the copy. False on ext4 and the like: read and hash."""
    with tempfile.TemporaryDirectory(prefix=".stowage-reflink-probe-", dir=directory) as tmp:
        a = os.path.join(tmp, "a")
        with open(a, "wb") as fh:
            fh.write(b"\x5a" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            reflink(a, os.path.join(tmp, "b"))
        except ExtentMapUnsupported:
            return False
        try:
            fiemap(a, sync=False)
        except ExtentMapUnsupported:
            return False
        return True
