"""The image pool: one sparse file per volume, reflink snapshots and clones.

<pool>/volumes/<id>.img, <pool>/snapshots/<id>.img, <pool>/trash/<kind>-<id>-<time>.img
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Iterator

from driver import faults, ids
from driver.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from driver.model import FsType, PoolUsage, TrashItem
from driver.records import RECORD_XATTR, ImageRecord, RecordError
from driver.storage.identity import fsync_dir

log = logging.getLogger(__name__)

FICLONE = 0x40049409
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
_TMP_SUFFIX = ".tmp"
# Space held back for meta.db. SQLite needs free blocks even to delete a row, so on a pool that
# thin volumes filled to the last block nothing could be deleted to free space. The reserve is a
# preallocated file released just before a metadata write would otherwise find no room.
META_RESERVE = ".meta-reserve"
META_RESERVE_BYTES = 16 * 1024 * 1024


_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP}
_MISSING_XATTR = errno.ENODATA  # Linux: getxattr of an attribute the file does not have


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _room(what: str) -> Iterator[None]:
    """A full pool (ENOSPC, EDQUOT, EFBIG) inside the block is RESOURCE_EXHAUSTED, saying
    `what` could not be done and the system's reason; any other OSError passes unchanged."""
    try:
        yield
    except OSError as exc:
        if _no_space(exc):
            raise ResourceExhausted(f"{what}: {exc.strerror}") from exc
        raise


@contextlib.contextmanager
def _opened(path: str, flags: int, missing: str) -> Iterator[int]:
    """An existing image open with `flags`; NOT_FOUND saying `missing` when there is none."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(missing) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _finish(fd: int, size: int, record: ImageRecord | None) -> None:
    """The last steps of every image made, copied or restored: grow it to `size` when it is
    smaller, give it its record, fsync."""
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    if record is not None:
        os.setxattr(fd, RECORD_XATTR, record.to_json())
    os.fsync(fd)


class ImagePool:
    def __init__(
        self,
        root: str,
        *,
        reserved_bytes: int = 0,
        inspect_only: bool = False,
        pool_uuid: str = "",
    ) -> None:
        """`inspect_only` opens the pool for reading (stowagectl check): nothing is created
        and reflink is not probed. `pool_uuid` goes into the records written from here on."""
        self.root = os.path.realpath(root)
        self.reserved_bytes = reserved_bytes
        self.pool_uuid = pool_uuid
        self._volumes = os.path.join(self.root, "volumes")
        self._snapshots = os.path.join(self.root, "snapshots")
        self._trash = os.path.join(self.root, "trash")
        self._restoring = os.path.join(self.root, "restoring")
        if not os.path.isdir(self.root):
            raise Unavailable(f"pool directory {self.root} does not exist")
        if inspect_only:
            self._reflink = False
            return
        for d in (self._volumes, self._snapshots, self._trash, self._restoring):
            os.makedirs(d, mode=0o700, exist_ok=True)
            if os.stat(d).st_mode & 0o077:
                os.chmod(d, 0o700)  # made before modes were enforced
            for name in os.listdir(d):  # so were snapshot images (0644 then)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(os.path.join(d, name)).st_mode & 0o077:
                        os.chmod(os.path.join(d, name), 0o600)
        self._reflink = self._probe_reflink()
        self._probe_xattr()
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
        fsync_dir(os.path.dirname(final))

    def create(
        self,
        volume_id: str,
        size: int,
        *,
        preallocate: bool = False,
        record: ImageRecord | None = None,
    ) -> None:
        """A new empty image, made under its final name: until the caller records the volume,
        a file here is an orphan that the start-up sweep moves to trash, so no temporary name
        and rename are needed (a copy, which can be half done, still uses one)."""
        final = self.image_path(volume_id)
        # Nothing is created when open fails, so nothing is discarded (EEXIST: not ours).
        with _room("the pool cannot hold a new image"):
            fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            with _room(f"the pool cannot hold {size} bytes"):
                try:
                    if preallocate:
                        os.posix_fallocate(fd, 0, size)
                    _finish(fd, size, record)
                finally:
                    os.close(fd)
                faults.hit("image:written")
                fsync_dir(os.path.dirname(final))
        except (OSError, ResourceExhausted):
            self._discard(final)
            raise

    def _copy_into(
        self, src: str, final: str, size: int, record: ImageRecord | None = None
    ) -> None:
        """Copy (reflink when possible) into `final` by way of a temporary name. The copy gets
        its own record (a reflink copies extents, not extended attributes) before it is fsynced
        and renamed, so a complete image under its final name always describes itself."""
        tmp = final + _TMP_SUFFIX
        try:
            with _room("the pool is full"):
                fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                with open(src, "rb") as s, open(fd, "wb") as d:
                    if not self._clone_fd(s.fileno(), d.fileno()):
                        _sparse_copy(s.fileno(), d.fileno())
                    _finish(d.fileno(), size, record)
                faults.hit("image:tmp-written")
                self._publish(tmp, final)
        except FileNotFoundError as exc:
            self._discard(tmp)
            raise NotFound(
                f"source image {os.path.basename(src)} is missing from the pool"
            ) from exc
        except (OSError, ResourceExhausted):
            self._discard(tmp)
            raise

    def clone_volume(
        self, source_id: str, volume_id: str, size: int, *, record: ImageRecord | None = None
    ) -> None:
        self._copy_into(self.image_path(source_id), self.image_path(volume_id), size, record)

    def restore_snapshot(
        self, snapshot_id: str, volume_id: str, size: int, *, record: ImageRecord | None = None
    ) -> None:
        self._copy_into(self.snapshot_path(snapshot_id), self.image_path(volume_id), size, record)

    def snapshot(
        self, volume_id: str, snapshot_id: str, *, record: ImageRecord | None = None
    ) -> None:
        self._copy_into(self.image_path(volume_id), self.snapshot_path(snapshot_id), 0, record)

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

    def _probe_xattr(self) -> None:
        """Image records live in a user extended attribute: refuse a pool filesystem without
        them (XFS, btrfs, ext4 and tmpfs since Linux 6.6 have them) rather than write images
        that cannot describe themselves."""
        probe = os.path.join(self._trash, ".xattr-probe")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.setxattr(fd, RECORD_XATTR, b"{}")
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in _NO_XATTR:
                raise FailedPrecondition(
                    f"the filesystem of pool {self.root} does not support user extended "
                    "attributes, where each image keeps its own record; use XFS, btrfs or ext4 "
                    "(user_xattr)"
                ) from exc
            raise
        finally:
            self._discard(probe)

    # --- self-descriptions --------------------------------------------------------------------
    # --- restores from off-node backups ------------------------------------------------------
    def restore_path(self, volume_id: str) -> str:
        """Where a restore from a backup writes the image of `volume_id` before it is adopted:
        <pool>/restoring/<id>.img (the engine keeps its partial state beside it)."""
        if not ids.is_volume_id(volume_id):
            raise InvalidArgument(f"{volume_id!r} is not a Stowage volume ID")
        return self._inside(os.path.join(self._restoring, volume_id + ".img"))

    def adopt_restored(self, volume_id: str, size: int, *, record: ImageRecord | None) -> None:
        """Move a completed restore into the pool as the image of `volume_id`, grown to `size`
        (a larger claim), carrying its record: durable before the caller records the volume."""
        src = self.restore_path(volume_id)
        final = self.image_path(volume_id)
        missing = f"the restored image of {volume_id} is missing"
        with _room("the pool is full"):
            with _opened(src, os.O_RDWR, missing) as fd:
                _finish(fd, size, record)
            self._publish(src, final)

    def discard_restore(self, volume_id: str) -> None:
        """Remove a restore's image and partial state (an abandoned or failed restore)."""
        base = self.restore_path(volume_id)
        for suffix in ("", ".stowage-partial", ".stowage-restore", ".stowage-restore.tmp"):
            self._discard(base + suffix)

    def _path_of(self, object_id: str) -> str:
        if ids.is_snapshot_id(object_id):
            return self.snapshot_path(object_id)
        return self.image_path(object_id)

    def read_record(self, object_id: str) -> ImageRecord | None:
        """The image's own record; None when it has none (or no image); RecordError when the
        record is there but unreadable or describes another image."""
        return read_record_at(self._path_of(object_id), object_id)

    def write_record(self, record: ImageRecord) -> None:
        """(Re)write an existing image's record, durably."""
        missing = f"image of {record.id} is missing from the pool"
        with (
            _opened(self._path_of(record.id), os.O_RDONLY, missing) as fd,
            _room(f"the pool has no room for the record of {record.id}"),
        ):
            _finish(fd, 0, record)

    def amend_record(
        self,
        object_id: str,
        *,
        size: int | None = None,
        formatted: bool | None = None,
        fs_type: FsType | None = None,
        mutable_parameters: dict[str, str] | None = None,
    ) -> None:
        """Change fields of an image's record (expansion, first format, ModifyVolume). An image
        without a record (made before records existed) is left alone: start-up writes its record."""
        try:
            old = self.read_record(object_id)
        except RecordError:
            old = None
        if old is None:
            return
        new = dataclasses.replace(
            old,
            size=old.size if size is None else size,
            formatted=old.formatted if formatted is None else formatted,
            fs_type=old.fs_type if fs_type is None else str(fs_type),
            mutable_parameters=(
                old.mutable_parameters if mutable_parameters is None else dict(mutable_parameters)
            ),
        )
        if new != old:
            self.write_record(new)

    def rescue_image(self, volume_id: str, device: str, record: ImageRecord | None) -> None:
        """Write the image of `volume_id` again from `device`, the loop device that still holds
        its deleted inode (someone removed the file while the volume was staged). The device
        must be quiescent (unmounted). Zero blocks stay holes; the copy is described, fsynced
        and renamed into place like any copy."""
        final = self.image_path(volume_id)
        tmp = final + _TMP_SUFFIX
        chunk = 1 << 20
        zero = bytes(chunk)
        try:
            with _room(f"the pool has no room to restore the image of {volume_id}"):
                src = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    dst = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                    try:
                        size = os.lseek(src, 0, os.SEEK_END)
                        offset = 0
                        while offset < size:
                            data = os.pread(src, min(chunk, size - offset), offset)
                            if not data:
                                break
                            if data != zero[: len(data)]:
                                os.pwrite(dst, data, offset)
                            offset += len(data)
                        _finish(dst, size, record)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
                self._publish(tmp, final)
        except (OSError, ResourceExhausted):
            self._discard(tmp)
            raise
        log.warning("restored the deleted image of %s from %s", volume_id, device)

    def _probe_reflink(self) -> bool:
        a = os.path.join(self._trash, ".reflink-probe-a")
        b = os.path.join(self._trash, ".reflink-probe-b")
        try:
            # FICLONE reads its source: a write-only source fails with EBADF on every
            # filesystem, which once made every pool look reflink-less (full copies).
            with open(os.open(a, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600), "r+b") as fa:
                fa.write(b"\0" * 4096)
                fa.flush()
                with open(os.open(b, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600), "wb") as fb:
                    fcntl.ioctl(fb.fileno(), FICLONE, fa.fileno())
            return True
        except OSError:
            return False
        finally:
            self._discard(a)
            self._discard(b)

    # --- growth and queries -------------------------------------------------------------------
    def expand(self, volume_id: str, size: int) -> None:
        missing = f"image of volume {volume_id} is missing from the pool"
        with (
            _opened(self.image_path(volume_id), os.O_WRONLY, missing) as fd,
            _room(f"the pool cannot grow {volume_id}"),
        ):
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
                os.fsync(fd)
            self.amend_record(volume_id, size=size)

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
            if not name.endswith(".img"):
                continue  # temporary copies are leftovers(), not images
            stem = name.removesuffix(".img")
            if check(stem):
                out.add(stem)
        return out

    def volume_ids(self) -> set[str]:
        """IDs with an image (under its final name) in the pool."""
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
            fsync_dir(os.path.dirname(path))
        return moved

    def trash_leftover(self, path: str) -> str:
        """Move a temporary copy (a `.tmp` leftover of an interrupted copy) into trash."""
        directory, name = os.path.split(path)
        stem = name.removesuffix(_TMP_SUFFIX).removesuffix(".img")
        if directory not in (self._volumes, self._snapshots) or not name.endswith(_TMP_SUFFIX):
            raise Internal(f"{path} is not a temporary copy in the pool")
        kind = "volume" if directory == self._volumes else "snapshot"
        dest = os.path.join(self._trash, f"{kind}-{stem}-{time.time_ns()}.img{_TMP_SUFFIX}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return ""
        fsync_dir(directory)
        return dest

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

    def empty_trash(self, older_than: float, claimed: Collection[str] = ()) -> int:
        """Remove trash older than `older_than` seconds, except what someone still claims: an
        item whose ID has a row (`claimed`) or that carries a readable record of its own. Those
        are never reclaimed here (`claimed_in_trash` lists them for a person)."""
        removed = 0
        for item in self.trash():
            if item.age_seconds >= older_than and not self._claimed(item.name, claimed):
                self._discard(os.path.join(self._trash, item.name))
                removed += 1
        return removed

    def claimed_in_trash(self, claimed: Collection[str] = ()) -> list[str]:
        """Names of trash items a row or their own record claims (never reclaimed)."""
        return [t.name for t in self.trash() if self._claimed(t.name, claimed)]

    def _claimed(self, name: str, claimed: Collection[str]) -> bool:
        object_id = trashed_id(name)
        if object_id and object_id in claimed:
            return True
        if name.endswith(_TMP_SUFFIX):
            return False  # a temporary copy: provably not a complete image
        try:
            return read_record_at(os.path.join(self._trash, name), "") is not None
        except RecordError:
            return True  # a record is there, if damaged: a person decides

    def trash(self) -> list[TrashItem]:
        items = []
        now = time.time()
        for name in sorted(os.listdir(self._trash)):
            if name.startswith((".reflink-probe", ".xattr-probe")):
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


_TRASHED = re.compile(
    rf"^(?:volume|snapshot)-([vs]-[0-9a-f]{{32}}|b-{ids.TARGET_NAME}-[0-9a-f]{{32}})"
    r"-\d+\.img(?:\.tmp)?$"
)


def trashed_id(name: str) -> str:
    """The volume or snapshot ID in a trash file name, "" for names not made by `_to_trash`."""
    m = _TRASHED.match(name)
    return m.group(1) if m else ""


def read_record_at(path: str, object_id: str) -> ImageRecord | None:
    """The record on the image at `path` (None: no record, or no file). With `object_id`, a
    record describing another ID is a RecordError (an image renamed by hand)."""
    try:
        raw = os.getxattr(path, RECORD_XATTR)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == _MISSING_XATTR or exc.errno in _NO_XATTR:
            return None
        raise
    record = ImageRecord.from_json(raw)
    if object_id and record.id != object_id:
        raise RecordError(f"the image of {object_id} carries the record of {record.id}")
    return record


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
