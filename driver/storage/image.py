"""The image pool: one sparse file per volume, reflink snapshots and clones.

<pool>/volumes/<id>.img, <pool>/snapshots/<id>.img, <pool>/trash/<kind>-<id>-<time>.img
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable

from driver import faults, ids
from driver.errors import Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from driver.model import PoolUsage, TrashItem

log = logging.getLogger(__name__)

FICLONE = 0x40049409
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
_TMP_SUFFIX = ".tmp"
# Space held back for meta.db. SQLite needs free blocks even to delete a row, so on a pool that
# thin volumes filled to the last block nothing could be deleted to free space. The reserve is a
# preallocated file released just before a metadata write would otherwise find no room.
META_RESERVE = ".meta-reserve"
META_RESERVE_BYTES = 16 * 1024 * 1024


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ImagePool:
    def __init__(self, root: str, *, reserved_bytes: int = 0, inspect_only: bool = False) -> None:
        """`inspect_only` opens the pool for reading (stowagectl check): nothing is created
        and reflink is not probed."""
        self.root = os.path.realpath(root)
        self.reserved_bytes = reserved_bytes
        self._volumes = os.path.join(self.root, "volumes")
        self._snapshots = os.path.join(self.root, "snapshots")
        self._trash = os.path.join(self.root, "trash")
        if not os.path.isdir(self.root):
            raise Unavailable(f"pool directory {self.root} does not exist")
        if inspect_only:
            self._reflink = False
            return
        for d in (self._volumes, self._snapshots, self._trash):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._reflink = self._probe_reflink()
        self._reserve = os.path.join(self.root, META_RESERVE)
        self.ensure_reserve()

    # --- room for the metadata store ----------------------------------------------------------
    def ensure_reserve(self) -> bool:
        """(Re)create the metadata reserve when there is comfortably room for it."""
        if os.path.exists(self._reserve):
            return True
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize < 4 * META_RESERVE_BYTES:
            return False
        tmp = self._reserve + _TMP_SUFFIX
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, META_RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._reserve)
        except OSError as exc:
            self._discard(tmp)
            if _no_space(exc):
                return False
            raise
        return True

    def keep_metadata_room(self) -> None:
        """Called before every metadata write: give the reserve up when the pool is full."""
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize < META_RESERVE_BYTES and os.path.exists(self._reserve):
            self._discard(self._reserve)
            log.warning("pool %s is full; released the metadata reserve", self.root)

    # --- paths, always from validated IDs -----------------------------------------------------
    def image_path(self, volume_id: str) -> str:
        if not ids.is_volume_id(volume_id):
            raise InvalidArgument(f"{volume_id!r} is not a Stowage volume ID")
        return self._inside(os.path.join(self._volumes, volume_id + ".img"))

    def snapshot_path(self, snapshot_id: str) -> str:
        if not ids.is_snapshot_id(snapshot_id):
            raise InvalidArgument(f"{snapshot_id!r} is not a Stowage snapshot ID")
        return self._inside(os.path.join(self._snapshots, snapshot_id + ".img"))

    def _inside(self, path: str) -> str:
        # Fast path (two lstat calls instead of realpath's one per component): `path` is built
        # from the directories resolved when the pool opened and a validated ID, so it can only
        # lead elsewhere through a symlink at the entry or at its directory; an entry that does
        # not exist yet leads nowhere. Anything else takes the full resolution below.
        try:
            if os.path.dirname(os.path.dirname(path)) == self.root and not stat.S_ISLNK(
                os.lstat(os.path.dirname(path)).st_mode
            ):
                try:
                    if not stat.S_ISLNK(os.lstat(path).st_mode):
                        return path
                except FileNotFoundError:
                    return path
        except OSError:
            pass
        real = os.path.realpath(path)
        if os.path.dirname(os.path.dirname(real)) != self.root:
            raise Internal(f"{path} resolves outside the pool")
        return real

    def owns(self, path: str) -> bool:
        return os.path.dirname(path) == self._volumes

    @property
    def reflink(self) -> bool:
        return self._reflink

    def healthy(self) -> bool:
        return all(
            os.path.isdir(d) and os.access(d, os.W_OK) for d in (self._volumes, self._snapshots)
        )

    # --- creation -----------------------------------------------------------------------------
    def _publish(self, tmp: str, final: str) -> None:
        """Make a complete temporary image visible under its final name, durably."""
        os.rename(tmp, final)
        _fsync_dir(os.path.dirname(final))

    def create(self, volume_id: str, size: int, *, preallocate: bool = False) -> None:
        """A new empty image, made under its final name: until the caller records the volume,
        a file here is an orphan that the start-up sweep moves to trash, so no temporary name
        and rename are needed (a copy, which can be half done, still uses one)."""
        final = self.image_path(volume_id)
        try:
            fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # nothing was created, so nothing is discarded (EEXIST: not ours)
            if _no_space(exc):
                raise ResourceExhausted(
                    f"the pool cannot hold a new image: {exc.strerror}"
                ) from exc
            raise
        try:
            try:
                if preallocate:
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            faults.hit("image:written")
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            self._discard(final)
            if _no_space(exc):
                raise ResourceExhausted(
                    f"the pool cannot hold {size} bytes: {exc.strerror}"
                ) from exc
            raise

    def _copy_into(self, src: str, final: str, size: int) -> None:
        tmp = final + _TMP_SUFFIX
        try:
            with open(src, "rb") as s, open(tmp, "wb") as d:
                if not self._clone_fd(s.fileno(), d.fileno()):
                    _sparse_copy(s.fileno(), d.fileno())
                if size > os.fstat(d.fileno()).st_size:
                    os.ftruncate(d.fileno(), size)
                os.fsync(d.fileno())
            faults.hit("image:tmp-written")
            self._publish(tmp, final)
        except FileNotFoundError as exc:
            self._discard(tmp)
            raise NotFound(
                f"source image {os.path.basename(src)} is missing from the pool"
            ) from exc
        except OSError as exc:
            self._discard(tmp)
            if _no_space(exc):
                raise ResourceExhausted(f"the pool is full: {exc.strerror}") from exc
            raise

    def clone_volume(self, source_id: str, volume_id: str, size: int) -> None:
        self._copy_into(self.image_path(source_id), self.image_path(volume_id), size)

    def restore_snapshot(self, snapshot_id: str, volume_id: str, size: int) -> None:
        self._copy_into(self.snapshot_path(snapshot_id), self.image_path(volume_id), size)

    def snapshot(self, volume_id: str, snapshot_id: str) -> None:
        self._copy_into(self.image_path(volume_id), self.snapshot_path(snapshot_id), 0)

    def _clone_fd(self, src: int, dst: int) -> bool:
        if not self._reflink:
            return False
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as exc:
            if exc.errno in _NO_REFLINK:
                return False
            raise
        return True

    def _probe_reflink(self) -> bool:
        a = os.path.join(self._trash, ".reflink-probe-a")
        b = os.path.join(self._trash, ".reflink-probe-b")
        try:
            with open(a, "wb") as fa:
                fa.write(b"\0" * 4096)
                fa.flush()
                with open(b, "wb") as fb:
                    fcntl.ioctl(fb.fileno(), FICLONE, fa.fileno())
            return True
        except OSError:
            return False
        finally:
            self._discard(a)
            self._discard(b)

    # --- growth and queries -------------------------------------------------------------------
    def expand(self, volume_id: str, size: int) -> None:
        path = self.image_path(volume_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"image of volume {volume_id} is missing from the pool") from exc
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        except OSError as exc:
            if _no_space(exc):
                raise ResourceExhausted(
                    f"the pool cannot grow {volume_id}: {exc.strerror}"
                ) from exc
            raise
        finally:
            os.close(fd)

    def volume_size(self, volume_id: str) -> int | None:
        try:
            return os.stat(self.image_path(volume_id)).st_size
        except FileNotFoundError:
            return None

    def snapshot_exists(self, snapshot_id: str) -> bool:
        return os.path.isfile(self.snapshot_path(snapshot_id))

    def _ids(self, directory: str, check: Callable[[str], bool]) -> set[str]:
        out = set()
        for name in os.listdir(directory):
            stem = name.removesuffix(_TMP_SUFFIX).removesuffix(".img")
            if check(stem):
                out.add(stem)
        return out

    def volume_ids(self) -> set[str]:
        """IDs with an image or a leftover temporary image in the pool."""
        return self._ids(self._volumes, ids.is_volume_id)

    def snapshot_ids(self) -> set[str]:
        return self._ids(self._snapshots, ids.is_snapshot_id)

    # --- removal: orphans are renamed into trash (atomic) and reclaimed later; deletes unlink --
    def _to_trash(self, path: str, kind: str, object_id: str) -> list[str]:
        """Rename the image and any leftover temporary copy into trash; return the new paths."""
        stamp = time.time_ns()
        moved = []
        for suffix in ("", _TMP_SUFFIX):
            dest = os.path.join(self._trash, f"{kind}-{object_id}-{stamp}.img{suffix}")
            try:
                os.rename(path + suffix, dest)
            except FileNotFoundError:
                continue
            moved.append(dest)
        if moved:
            _fsync_dir(os.path.dirname(path))
        return moved

    def trash_orphan(self, kind: str, object_id: str) -> str:
        path = self.image_path(object_id) if kind == "volume" else self.snapshot_path(object_id)
        return ", ".join(self._to_trash(path, kind, object_id))

    def delete_volume(self, volume_id: str) -> None:
        self._delete(self.image_path(volume_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._delete(self.snapshot_path(snapshot_id))

    def _delete(self, path: str) -> None:
        """Remove an image whose record the caller has already removed (durably). Nothing here
        needs to be durable: an image that comes back after a crash has no record, so the
        start-up sweep moves it to trash like any orphan."""
        self._discard(path)
        faults.hit("image:unlinked")
        self._discard(path + _TMP_SUFFIX)
        self.ensure_reserve()

    def empty_trash(self, older_than: float) -> int:
        removed = 0
        for item in self.trash():
            if item.age_seconds >= older_than:
                self._discard(os.path.join(self._trash, item.name))
                removed += 1
        return removed

    def trash(self) -> list[TrashItem]:
        items = []
        now = time.time()
        for name in sorted(os.listdir(self._trash)):
            if name.startswith(".reflink-probe"):
                continue
            try:
                st = os.lstat(os.path.join(self._trash, name))
            except FileNotFoundError:
                continue
            age = now - _trashed_at(name, st.st_mtime)
            items.append(TrashItem(name, max(0.0, age), st.st_blocks * 512))
        return items

    def leftovers(self) -> list[str]:
        return sorted(
            os.path.join(d, n)
            for d in (self._volumes, self._snapshots)
            for n in os.listdir(d)
            if n.endswith(_TMP_SUFFIX)
        )

    def allocated_bytes(self, object_id: str) -> int:
        path = (
            self.snapshot_path(object_id)
            if ids.is_snapshot_id(object_id)
            else self.image_path(object_id)
        )
        try:
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    @staticmethod
    def _discard(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def usage(self) -> PoolUsage:
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise Unavailable(f"pool {self.root} is unusable: {exc.strerror}") from exc
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return PoolUsage(total, max(0, free - self.reserved_bytes), self._reflink, free)


def _trashed_at(name: str, mtime: float) -> float:
    """When a file entered trash: the stamp `_to_trash` put in its name. The file's mtime is its
    last data write, which may be long before the delete, so it is only the fallback for names
    written by hand."""
    stem = name.removesuffix(_TMP_SUFFIX).removesuffix(".img")
    stamp = stem.rsplit("-", 1)[-1]
    return int(stamp) / 1e9 if stamp.isdigit() else mtime


def _sparse_copy(src: int, dst: int) -> None:
    """Copy only the data extents of `src`, leaving holes as holes."""
    end = os.fstat(src).st_size
    offset = 0
    while offset < end:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            n = os.copy_file_range(src, dst, hole - pos, pos, pos)
            if n == 0:
                break
            pos += n
        offset = hole
    os.ftruncate(dst, end)
