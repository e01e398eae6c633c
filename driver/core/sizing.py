"""Sizing policy: what size a volume gets for a capacity range, in one place for CreateVolume,
ControllerExpandVolume and NodeExpandVolume."""

from __future__ import annotations

from driver.errors import InvalidArgument, OutOfRange
from driver.host import fs
from driver.model import CapacityRange, FsType, GiB, MiB

MIN_BLOCK_SIZE = 1 * MiB
SIZE_ALIGNMENT = 1 * MiB
DEFAULT_VOLUME_SIZE = 1 * GiB
MAX_SIZE = 2**63 - 1  # capacity_bytes is an int64 on the wire


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def check_range(rng: CapacityRange) -> None:
    """A capacity range that contradicts itself is malformed, whatever the volume."""
    if rng.required < 0 or rng.limit < 0:
        raise InvalidArgument("capacity_range values must not be negative")
    if rng.limit and rng.required > rng.limit:
        raise InvalidArgument(
            f"required_bytes {rng.required} is larger than limit_bytes {rng.limit}"
        )


def resolve_size(rng: CapacityRange, fs_type: FsType | None, floor: int = 0) -> int:
    """The size to allocate for a capacity range: at least `floor` (e.g. the source's size) and
    the filesystem's minimum (MIN_BLOCK_SIZE for a block volume, `fs_type` None), rounded up
    to SIZE_ALIGNMENT, never above the limit."""
    check_range(rng)
    minimum = fs.FILESYSTEMS[fs_type].min_size if fs_type is not None else MIN_BLOCK_SIZE
    lower = max(rng.required, minimum, floor)
    want = max(rng.required or DEFAULT_VOLUME_SIZE, lower)
    if rng.limit:
        want = min(want, rng.limit) if not rng.required else want
        want = max(want, lower)
    size = _align_up(want, SIZE_ALIGNMENT)
    if rng.limit and size > rng.limit:
        # The MiB-aligned size overshoots the limit: take the largest MiB-aligned size under
        # the limit if it still holds what is needed, else the smallest 4 KiB-aligned one.
        size = rng.limit // SIZE_ALIGNMENT * SIZE_ALIGNMENT
        if size < lower:
            size = _align_up(lower, 4096)
        if size > rng.limit:
            raise OutOfRange(
                f"cannot fit a volume in limit_bytes {rng.limit}: needs at least {lower} bytes "
                f"(filesystem minimum {minimum}, source size {floor})"
            )
    if size > MAX_SIZE:
        raise OutOfRange(f"{size} bytes is more than a volume can be ({MAX_SIZE} bytes)")
    return size
