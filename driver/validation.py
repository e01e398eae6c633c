"""Pure request checks on domain values: names, capabilities, mount flags, parameters, paths.
Sizes are decided in driver.core.sizing."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping

from driver import (
    MUTABLE_READ_BPS,
    MUTABLE_READ_IOPS,
    MUTABLE_WRITE_BPS,
    MUTABLE_WRITE_IOPS,
    ids,
)
from driver.errors import InvalidArgument, NotFound
from driver.model import (
    DEFAULT_FS_TYPE,
    SUPPORTED_FS_TYPES,
    AccessMode,
    AccessType,
    Capability,
    FsType,
    IoLimits,
)

MAX_STRING_BYTES = 128
MAX_MAP_BYTES = 4096
MAX_PATH_BYTES = 4096
MAX_FLAGS_BYTES = 4096
MAX_GID = 2**32 - 2
_GID = re.compile(r"[0-9]{1,10}")

# Parameters a StorageClass may carry. csi.storage.k8s.io/* keys are the provisioner's own and
# never reach us; the extra-create-metadata keys below do.
KNOWN_PARAMETERS = frozenset(
    {
        "fsType",
        "csi.storage.k8s.io/fstype",
        "preallocate",
        "csi.storage.k8s.io/pvc/name",
        "csi.storage.k8s.io/pvc/namespace",
        "csi.storage.k8s.io/pv/name",
    }
)

# Mount options a user may ask for. Anything else, and anything that would re-enable suid or
# device files, bind, move or remount, is refused.
_ALLOWED_FLAGS = frozenset(
    {
        "ro",
        "rw",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "noexec",
        "nosuid",
        "nodev",
        "sync",
        "async",
        "dirsync",
        "discard",
        "nodiscard",
        "acl",
        "noacl",
        "user_xattr",
        "nouser_xattr",
        "barrier",
        "nobarrier",
        "data=ordered",
        "data=writeback",
        "data=journal",
        "errors=remount-ro",
        "errors=continue",
        "usrquota",
        "grpquota",
        "prjquota",
        "uquota",
        "gquota",
        "pquota",
        "noquota",
        "inode64",
        "largeio",
        "nolargeio",
        "wsync",
        "attr2",
        "noattr2",
        "ssd",
        "nossd",
        "autodefrag",
        "noautodefrag",
        "space_cache=v2",
        "compress",
        "compress=zstd",
        "compress=lzo",
        "compress=zlib",
        "compress-force=zstd",
        "datasum",
        "nodatasum",
        "datacow",
        "nodatacow",
    }
)
_ALLOWED_VALUED = {
    "commit": re.compile(r"^\d{1,5}$"),
    "allocsize": re.compile(r"^\d{1,10}[kmgKMG]?$"),
    "logbufs": re.compile(r"^\d{1,2}$"),
    "logbsize": re.compile(r"^\d{1,6}[kK]?$"),
    "stripe": re.compile(r"^\d{1,6}$"),
    "context": re.compile(r'^"?[a-z0-9_]+:[a-z0-9_]+:[a-z0-9_]+:s\d+(:c\d+(,c\d+)*)?"?$'),
}


def check_string(field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return
    if len(value.encode("utf-8")) > MAX_STRING_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_STRING_BYTES} bytes")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise InvalidArgument(f"{field} contains control characters")


def check_map(field: str, values: Mapping[str, str]) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    if size > MAX_MAP_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_MAP_BYTES} bytes")


def present(**fields: object) -> None:
    """INVALID_ARGUMENT for the first required field that is empty (checked before anything
    else, so a request missing a field is never answered NOT_FOUND)."""
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(f"{name} is required")


def require_volume_id(value: str, field: str = "volume_id") -> str:
    """A missing ID is INVALID_ARGUMENT; a malformed one cannot be ours, so NOT_FOUND."""
    return _require_id("volume", ids.is_volume_id, value, field)


def require_snapshot_id(value: str, field: str = "snapshot_id") -> str:
    return _require_id("snapshot", ids.is_snapshot_id, value, field)


def _require_id(kind: str, valid: Callable[[str], bool], value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not valid(value):
        raise NotFound(f"{kind} {value[:MAX_STRING_BYTES]!r} does not exist")
    return value


_POD_UID = re.compile(r"[0-9a-fA-F-]{1,64}")


def check_pod_uid(value: str) -> None:
    """The pod UID kubelet passes with podInfoOnMount ("" when it does not): a cgroup name is
    matched against it, so nothing but a UUID's characters."""
    if value and not _POD_UID.fullmatch(value):
        raise InvalidArgument(f"volume_context pod UID {value[:MAX_STRING_BYTES]!r} is not a UID")


def require_path(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value.encode("utf-8")) > MAX_PATH_BYTES or "\0" in value:
        raise InvalidArgument(f"{field} is not a usable path")
    if not os.path.isabs(value):
        raise InvalidArgument(f"{field} must be an absolute path, got {value!r}")
    if ".." in value.split("/"):
        # normpath would resolve ".." lexically, which is not what the kernel does when a
        # symlink precedes it; kubelet never sends one, so refuse instead of guessing.
        raise InvalidArgument(f"{field} must not contain '..', got {value!r}")
    return os.path.normpath(value)


def require_outside(field: str, path: str, root: str) -> None:
    """A kubelet path must neither lie inside the pool nor contain it: mounting there would
    hide or expose the pool's images."""
    if (
        path == root
        or path.startswith(root.rstrip("/") + "/")
        or root.startswith(path.rstrip("/") + "/")
    ):
        raise InvalidArgument(f"{field} {path!r} overlaps the storage pool {root}")


def check_capabilities(caps: Iterable[Capability]) -> list[Capability]:
    out = list(caps)
    if not out:
        raise InvalidArgument("volume_capabilities is required")
    for cap in out:
        check_capability(cap)
    return out


def check_capability(cap: Capability) -> None:
    if cap.access_mode == AccessMode.UNKNOWN:
        raise InvalidArgument("access_mode is required")
    if cap.access_mode.multi_node:
        raise InvalidArgument(
            f"access mode {cap.access_mode.name} is not supported: Stowage volumes are "
            "node-local and cannot be shared across nodes"
        )
    if cap.access_type is AccessType.MOUNT:
        if cap.fs_type and cap.fs_type not in SUPPORTED_FS_TYPES:
            raise InvalidArgument(
                f"filesystem type {cap.fs_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_FS_TYPES)}"
            )
        flags = check_mount_flags(cap.mount_flags)
        if cap.access_mode.read_only and "rw" in flags:
            raise InvalidArgument(
                f"mount option 'rw' contradicts access mode {cap.access_mode.name}"
            )
        if cap.mount_group and not (
            _GID.fullmatch(cap.mount_group) and int(cap.mount_group) <= MAX_GID
        ):
            raise InvalidArgument(
                f"volume_mount_group must be a numeric group ID, got {cap.mount_group!r}"
            )
    elif cap.mount_flags or cap.fs_type:
        raise InvalidArgument("block volumes take no filesystem type or mount flags")


def split_mount_flags(flags: Iterable[str]) -> list[str]:
    """Split each flag on commas, except inside double quotes (SELinux context="a:b:c:s0:c1,c2")."""
    parts: list[str] = []
    for flag in flags:
        current, quoted = "", False
        for ch in flag:
            if ch == '"':
                quoted = not quoted
            if ch == "," and not quoted:
                parts.append(current)
                current = ""
            else:
                current += ch
        if quoted:
            raise InvalidArgument(f"mount option {flag!r} has an unbalanced quote")
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def check_mount_flags(flags: Iterable[str]) -> list[str]:
    flags = list(flags)
    if sum(len(f.encode("utf-8")) + 1 for f in flags) > MAX_FLAGS_BYTES:
        raise InvalidArgument(f"mount options are longer than {MAX_FLAGS_BYTES} bytes")
    parts = split_mount_flags(flags)
    for part in parts:
        if part in _ALLOWED_FLAGS:
            continue
        key, sep, value = part.partition("=")
        pattern = _ALLOWED_VALUED.get(key)
        if sep and pattern is not None and pattern.fullmatch(value):
            continue
        raise InvalidArgument(f"mount option {part!r} is not allowed")
    return parts


def fs_type_for(
    caps: Iterable[Capability], parameters: Mapping[str, str]
) -> tuple[AccessType, FsType | None]:
    """The access type and filesystem a new volume gets from its capabilities and parameters
    (None for a block volume)."""
    caps = list(caps)
    types = {c.access_type for c in caps}
    if len(types) > 1:
        raise InvalidArgument("a volume cannot be requested as both block and mount")
    access = types.pop()
    if access is AccessType.BLOCK:
        return access, None
    requested = {c.fs_type for c in caps if c.fs_type}
    param = parameters.get("csi.storage.k8s.io/fstype") or parameters.get("fsType") or ""
    if param:
        requested.add(param)
    if len(requested) > 1:
        raise InvalidArgument(f"conflicting filesystem types requested: {sorted(requested)}")
    fs = requested.pop() if requested else DEFAULT_FS_TYPE
    if fs not in SUPPORTED_FS_TYPES:
        raise InvalidArgument(
            f"filesystem type {fs!r} is not supported; use one of {', '.join(SUPPORTED_FS_TYPES)}"
        )
    return access, FsType(fs)


def check_parameters(parameters: Mapping[str, str]) -> None:
    check_map("parameters", parameters)
    unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS)
    if unknown:
        raise InvalidArgument(
            f"unknown parameter(s) {', '.join(repr(k) for k in unknown)}; "
            f"known: {', '.join(sorted(KNOWN_PARAMETERS))}"
        )
    pre = parameters.get("preallocate", "false")
    if pre not in ("true", "false"):
        raise InvalidArgument(f"parameter preallocate must be 'true' or 'false', got {pre!r}")


def unsupported_capability(
    volume_id: str,
    caps: Iterable[Capability],
    access: AccessType,
    fs_type: FsType | None,
    formatted: bool,
) -> str:
    """Why `caps` cannot be used with this volume, or "" when every one can."""
    for cap in caps:
        try:
            check_capability(cap)
        except InvalidArgument as exc:
            return str(exc)
        if cap.access_type is not access:
            return f"volume {volume_id} is a {access.value} volume"
        if cap.fs_type and formatted and cap.fs_type != fs_type:
            return f"volume {volume_id} holds {fs_type}, not {cap.fs_type}"
    return ""


# --- mutable parameters (VolumeAttributesClass) -----------------------------------------------
#: The value that lifts a limit (a limit of 0 is refused: it would stop all I/O in cgroup v1).
UNLIMITED = "unlimited"
MAX_IOPS = 10_000_000  # far above any device; the kernel keeps IOPS limits in 32 bits
MIN_BPS = 4096  # below one 4 KiB block per second a volume is unusable, not limited
MAX_BPS = 1 << 40  # 1 TiB/s
_IOPS = re.compile(r"[0-9]{1,8}")
_BPS = re.compile(r"[0-9]{1,13}(Ki|Mi|Gi|Ti|k|M|G|T)?")
_BPS_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
# key -> (IoLimits field, is a byte rate)
MUTABLE_PARAMETERS: dict[str, tuple[str, bool]] = {
    MUTABLE_READ_IOPS: ("read_iops", False),
    MUTABLE_WRITE_IOPS: ("write_iops", False),
    MUTABLE_READ_BPS: ("read_bps", True),
    MUTABLE_WRITE_BPS: ("write_bps", True),
}


def _limit(key: str, value: str) -> int:
    """One limit's value: IOPS a whole number 1..MAX_IOPS, bytes/s a whole number with an
    optional binary or decimal suffix (`50Mi`), MIN_BPS..MAX_BPS."""
    is_bps = MUTABLE_PARAMETERS[key][1]
    shown = value[:MAX_STRING_BYTES]
    match = (_BPS if is_bps else _IOPS).fullmatch(value)
    if match is None:
        kind = "a whole number of bytes per second (e.g. 52428800 or 50Mi)" if is_bps else (
            "a whole number of I/O operations per second"
        )
        raise InvalidArgument(f"{key} must be {kind} or {UNLIMITED!r}, got {shown!r}")
    if is_bps:
        unit = match.group(1) or ""
        number = int(value[: len(value) - len(unit)]) * _BPS_UNITS[unit]
    else:
        number = int(value)
    low, high = (MIN_BPS, MAX_BPS) if is_bps else (1, MAX_IOPS)
    if not low <= number <= high:
        raise InvalidArgument(
            f"{key} must be between {low} and {high} (or {UNLIMITED!r} for no limit), "
            f"got {shown!r}"
        )
    return number


def merge_mutable_parameters(
    current: Mapping[str, str], requested: Mapping[str, str]
) -> dict[str, str]:
    """The mutable parameters a volume has after `requested` is applied to `current`: keys
    not mentioned keep their value, `unlimited` removes a limit. Every key and value is
    checked before anything is merged, so a refused request changes nothing. Values are kept
    normalised (a plain number of IOPS or bytes per second)."""
    check_map("mutable_parameters", requested)
    fixed = sorted(k for k in requested if k in KNOWN_PARAMETERS)
    if fixed:
        raise InvalidArgument(
            f"parameter(s) {', '.join(repr(k) for k in fixed)} cannot be modified: they are "
            "fixed when the volume is created (StorageClass parameters)"
        )
    unknown = sorted(k for k in requested if k not in MUTABLE_PARAMETERS)
    if unknown:
        raise InvalidArgument(
            f"unknown mutable parameter(s) {', '.join(repr(k[:MAX_STRING_BYTES]) for k in unknown)}"
            f"; known: {', '.join(sorted(MUTABLE_PARAMETERS))}"
        )
    out = dict(current)
    changes = {k: None if v == UNLIMITED else str(_limit(k, v)) for k, v in requested.items()}
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def io_limits(mutable: Mapping[str, str]) -> IoLimits:
    """The limits a volume's stored (normalised) mutable parameters describe."""
    fields = {k: int(v) for k, v in mutable.items() if k in MUTABLE_PARAMETERS}
    values = {MUTABLE_PARAMETERS[k][0]: v for k, v in fields.items()}
    return IoLimits(**values)
