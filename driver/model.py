"""Domain model: what a volume, a snapshot and a capability are, free of protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class AccessType(enum.StrEnum):
    MOUNT = "mount"
    BLOCK = "block"


class AccessMode(enum.IntEnum):
    """CSI VolumeCapability.AccessMode.Mode values (same numbers as the wire)."""

    UNKNOWN = 0
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7

    @property
    def read_only(self) -> bool:
        return self in (AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY)

    @property
    def multi_node(self) -> bool:
        return self in (
            AccessMode.MULTI_NODE_READER_ONLY,
            AccessMode.MULTI_NODE_SINGLE_WRITER,
            AccessMode.MULTI_NODE_MULTI_WRITER,
        )

    @property
    def single_target(self) -> bool:
        """At most one publication (target path) on the node at a time."""
        return self is AccessMode.SINGLE_NODE_SINGLE_WRITER


class FsType(enum.StrEnum):
    """A filesystem Stowage makes on a volume. Block volumes have none (`None` wherever a
    volume, snapshot or staging carries an `FsType | None`). What each one needs (mkfs
    arguments, minimum size, mount options, check, growth) is one table:
    driver.host.fs.FILESYSTEMS."""

    EXT4 = "ext4"
    XFS = "xfs"
    BTRFS = "btrfs"

    @staticmethod
    def stored(text: str) -> FsType | None:
        """The stored form read back: "" (how rows, image records and manifests write a
        block volume's) is None. ValueError for a name that is not an FsType."""
        return FsType(text) if text else None


SUPPORTED_FS_TYPES = tuple(t.value for t in FsType)
DEFAULT_FS_TYPE = FsType.EXT4


@dataclass(frozen=True)
class Capability:
    """A requested capability as the CO sent it: `fs_type` is the request's own text ("" when
    it names none), checked against FsType by validation.check_capability."""

    access_type: AccessType
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    mount_group: str = ""


@dataclass(frozen=True)
class CapacityRange:
    required: int = 0
    limit: int = 0


@dataclass(frozen=True)
class ContentSource:
    kind: str  # "snapshot" | "volume"
    id: str


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size: int
    access_type: AccessType
    fs_type: FsType | None  # None for block volumes
    formatted: bool
    source: ContentSource | None
    parameters: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    sector_size: int = 4096  # logical sector size of its loop device; fixed for life
    # Its mutable parameters (I/O limits) as validation.merge_mutable_parameters normalised
    # them; changed by ControllerModifyVolume.
    mutable_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IoLimits:
    """A volume's I/O limits, applied to its loop device in the cgroups of the pods using it.
    0 means unlimited."""

    read_iops: int = 0
    write_iops: int = 0
    read_bps: int = 0
    write_bps: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.read_iops or self.write_iops or self.read_bps or self.write_bps)


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    source_volume_id: str
    size: int
    fs_type: FsType | None  # the source volume's; None for block
    access_type: AccessType
    formatted: bool
    created_at: float
    ready: bool = True
    sector_size: int = 4096
    group_id: str = ""  # the group snapshot (g-...) it was taken in, "" for a single snapshot


@dataclass(frozen=True)
class GroupSnapshot:
    """Snapshots of several volumes taken at one point in time (CreateVolumeGroupSnapshot)."""

    id: str
    name: str
    created_at: float
    snapshots: tuple[Snapshot, ...]

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.snapshots)


class BackupPhase(enum.StrEnum):
    """Where the upload of a backup snapshot stands (docs/design.md, "Backups")."""

    PENDING = "pending"  # local copy taken, upload queued (or to be resumed at start-up)
    UPLOADING = "uploading"
    DONE = "done"  # manifest durable in the target: ready_to_use
    FAILED = "failed"  # last attempt failed; the next CreateSnapshot call reports and retries


@dataclass(frozen=True)
class BackupState:
    snapshot_id: str
    target: str
    phase: BackupPhase
    done_bytes: int = 0
    total_bytes: int = 0
    error_code: str = ""  # the driver.errors class name of the last failure
    error: str = ""
    updated_at: float = 0.0
    keep_local: bool = True  # False: the local copy is dropped once the upload is done


@dataclass(frozen=True)
class PendingRestore:
    """A CreateVolume from a backup whose bytes are still being downloaded: the volume ID is
    fixed at the first call so that retries and restarts continue the same restore."""

    name: str
    volume_id: str
    snapshot_id: str
    created_at: float


@dataclass(frozen=True)
class Staging:
    volume_id: str
    path: str
    device: str
    access_type: AccessType
    fs_type: FsType | None  # None for block volumes
    readonly: bool
    mount_flags: tuple[str, ...]


@dataclass(frozen=True)
class Publication:
    volume_id: str
    target: str
    readonly: bool
    access_mode: AccessMode
    pod_uid: str = ""  # from volume_context with podInfoOnMount; where I/O limits are applied


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str


@dataclass(frozen=True)
class VolumeStats:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int | None
    used_inodes: int | None
    available_inodes: int | None
    condition: Condition


@dataclass(frozen=True)
class PoolUsage:
    total_bytes: int
    available_bytes: int  # free space minus the reservation, never negative
    reflink: bool
    free_bytes: int = 0  # free space on the pool filesystem, reservation included


@dataclass(frozen=True)
class TrashItem:
    """An orphaned image (no record described it) waiting in <pool>/trash for reclamation;
    deleted images are unlinked, never trashed."""

    name: str
    age_seconds: float
    allocated_bytes: int


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str
