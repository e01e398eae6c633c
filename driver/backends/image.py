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

from driver import ids
from driver.errors import Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from driver.model import PoolUsage

log = logging.getLogger(__name__)

FICLONE = 0x40049409
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
_TMP_SUFFIX = ".tmp"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ImagePool:
    def __init__(self, root: str, *, reserved_bytes: int = 0) -> None:
        self.root = os.path.realpath(root)
        self.reserved_bytes = reserved_bytes
        self._volumes = os.path.join(self.root, "volumes")
        self._snapshots = os.path.join(self.root, "snapshots")
        self._trash = os.path.join(self.root, "trash")
        if not os.path.isdir(self.root):
            raise Unavailable(f"pool directory {self.root} does not exist")
        for d in (self._volumes, self._snapshots, self._trash):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._reflink = self._probe_reflink()

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
        # lead elsewhere through a symlink at the entry or at its directory. Anything else,
        # including an entry that does not exist yet, takes the full resolution below.
        try:
            if (
                os.path.dirname(os.path.dirname(path)) == self.root
                and not stat.S_ISLNK(os.lstat(path).st_mode)
                and not stat.S_ISLNK(os.lstat(os.path.dirname(path)).st_mode)
            ):
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
        final = self.image_path(volume_id)
        tmp = final + _TMP_SUFFIX
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                if preallocate:
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, final)
        except OSError as exc:
            self._discard(tmp)
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

    # --- removal: rename into trash (atomic), then reclaim ------------------------------------
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
        for moved in self._to_trash(self.image_path(volume_id), "volume", volume_id):
            self._discard(moved)

    def delete_snapshot(self, snapshot_id: str) -> None:
        for moved in self._to_trash(self.snapshot_path(snapshot_id), "snapshot", snapshot_id):
            self._discard(moved)

    def empty_trash(self, older_than: float) -> int:
        removed = 0
        now = time.time()
        for name in os.listdir(self._trash):
            if name.startswith(".reflink-probe"):
                continue
            path = os.path.join(self._trash, name)
            try:
                if now - os.lstat(path).st_mtime >= older_than:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

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
        return PoolUsage(total, max(0, free - self.reserved_bytes), self._reflink)


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
