"""Self-descriptions: what a pool and each of its images say about themselves.

Two records, both JSON with a format number, both written by the driver and readable without it:

- `PoolRecord` is `<pool>/pool.json`: the pool's UUID and when it was made. A directory without
  it is not a pool (a data disk that failed to mount), so the driver never starts a new pool
  there by accident.
- `ImageRecord` travels with each image (the `user.stowage.record` extended attribute): enough
  to rebuild the image's row in `meta.db` — volume or snapshot ID, name, size, filesystem,
  sector size, block or mount, content source, creation time, the pool's UUID. `meta.db` is an
  index of these records, not the only copy of them.

This module is a leaf (no I/O): the image pool stores the bytes, the store and the rebuild turn
records into rows, and backup manifests reuse `ImageRecord` for the fields they share.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from driver import ids
from driver.model import AccessType, ContentSource, FsType, Snapshot, Volume

POOL_FORMAT = 1
RECORD_FORMAT = 1
RECORD_XATTR = "user.stowage.record"
# A group snapshot's members carry the group in their records' parameters (snapshots have no
# other parameters), so a store rebuilt from the records has its groups again.
GROUP_ID_PARAMETER = "stowage.csi.io/group-snapshot-id"
GROUP_NAME_PARAMETER = "stowage.csi.io/group-snapshot-name"

class RecordError(ValueError):
    """A record that cannot be read: not JSON, an unknown format, a missing or wrong field."""


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    wants_bool = kind is bool
    if isinstance(value, bool) != wants_bool or not isinstance(value, kind):
        raise RecordError(f"field {key!r} is missing or has the wrong type")
    return value


def _load(raw: bytes | str, what: str, fmt: int) -> dict[str, Any]:
    """A JSON object of format `fmt`; RecordError for anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError(f"{what} is not a JSON object")
    found = _require(data, "format", int)
    if found != fmt:
        raise RecordError(f"{what} has format {found}; this driver reads {fmt}")
    return data


@dataclass(frozen=True)
class PoolRecord:
    uuid: str
    created_at: float
    format: int = POOL_FORMAT

    @staticmethod
    def new(now: float) -> PoolRecord:
        return PoolRecord(str(uuid.uuid4()), now)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode()

    @staticmethod
    def from_json(raw: bytes | str) -> PoolRecord:
        data = _load(raw, "pool.json", POOL_FORMAT)
        text = _require(data, "uuid", str)
        try:
            parsed = str(uuid.UUID(text))
        except ValueError as exc:
            raise RecordError(f"pool.json uuid {text!r} is not a UUID") from exc
        return PoolRecord(parsed, float(_require(data, "created_at", (int, float))), POOL_FORMAT)


@dataclass(frozen=True)
class ImageRecord:
    """One image's description. `kind` is "volume" or "snapshot"; for a snapshot `source_id`
    is the volume it was cut from and `parameters` is empty."""

    kind: str
    id: str
    name: str
    size: int
    access_type: str
    fs_type: str  # an FsType's name, "" for block
    formatted: bool
    sector_size: int
    created_at: float
    pool_uuid: str
    source_kind: str = ""  # "", "snapshot" or "volume"
    source_id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    format: int = RECORD_FORMAT
    mutable_parameters: dict[str, str] = field(default_factory=dict)  # volumes: I/O limits

    # --- from and to the domain model ------------------------------------------------------
    @staticmethod
    def _of(kind: str, o: Volume | Snapshot, pool_uuid: str, **rest: Any) -> ImageRecord:
        """The fields volumes and snapshots share, and `rest`."""
        return ImageRecord(
            kind=kind,
            id=o.id,
            name=o.name,
            size=o.size,
            access_type=o.access_type.value,
            fs_type=str(o.fs_type or ""),
            formatted=o.formatted,
            sector_size=o.sector_size,
            created_at=o.created_at,
            pool_uuid=pool_uuid,
            **rest,
        )

    @staticmethod
    def of_volume(v: Volume, pool_uuid: str) -> ImageRecord:
        return ImageRecord._of(
            "volume",
            v,
            pool_uuid,
            source_kind=v.source.kind if v.source else "",
            source_id=v.source.id if v.source else "",
            parameters=dict(v.parameters),
            mutable_parameters=dict(v.mutable_parameters),
        )

    @staticmethod
    def of_snapshot(s: Snapshot, pool_uuid: str, group_name: str = "") -> ImageRecord:
        """`group_name`: the name of the group snapshot `s.group_id` (members only)."""
        group = (
            {GROUP_ID_PARAMETER: s.group_id, GROUP_NAME_PARAMETER: group_name}
            if s.group_id
            else {}
        )
        return ImageRecord._of(
            "snapshot",
            s,
            pool_uuid,
            source_kind="volume",
            source_id=s.source_volume_id,
            parameters=group,
        )

    def volume(self) -> Volume:
        source = ContentSource(self.source_kind, self.source_id) if self.source_kind else None
        return Volume(
            id=self.id,
            name=self.name,
            size=self.size,
            access_type=AccessType(self.access_type),
            fs_type=FsType.stored(self.fs_type),
            formatted=self.formatted,
            source=source,
            parameters=dict(self.parameters),
            created_at=self.created_at,
            sector_size=self.sector_size,
            mutable_parameters=dict(self.mutable_parameters),
        )

    def snapshot(self) -> Snapshot:
        return Snapshot(
            id=self.id,
            name=self.name,
            source_volume_id=self.source_id,
            size=self.size,
            fs_type=FsType.stored(self.fs_type),
            access_type=AccessType(self.access_type),
            formatted=self.formatted,
            created_at=self.created_at,
            sector_size=self.sector_size,
            group_id=self.group[0] if self.group else "",
        )

    @property
    def group(self) -> tuple[str, str] | None:
        """(group snapshot ID, its name) for a member of a group snapshot, else None."""
        gid = self.parameters.get(GROUP_ID_PARAMETER, "")
        if self.kind != "snapshot" or not ids.is_group_snapshot_id(gid):
            return None
        return gid, self.parameters.get(GROUP_NAME_PARAMETER, "")

    def manifest_fields(self) -> dict[str, Any]:
        """The fields a backup manifest shares with a snapshot's record, under the manifest's
        names (`driver.backup.engine.SnapshotRecord`): one source for both."""
        if self.kind != "snapshot":
            raise RecordError(f"{self.id} is a volume; backups are cut from snapshots")
        created = datetime.fromtimestamp(self.created_at, UTC).isoformat().replace("+00:00", "Z")
        return {
            "snapshot_id": self.id,
            "source_volume_id": self.source_id,
            "name": self.name,
            "filesystem": self.fs_type,
            "sector_size": self.sector_size,
            "created": created,
        }

    # --- bytes ------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def from_json(raw: bytes | str) -> ImageRecord:
        """Parse and check a record; RecordError says what is wrong with it."""
        data = _load(raw, "image record", RECORD_FORMAT)
        kind = _require(data, "kind", str)
        object_id = _require(data, "id", str)
        if kind == "volume":
            if not ids.is_volume_id(object_id):
                raise RecordError(f"{object_id!r} is not a volume ID")
        elif kind == "snapshot":
            if not ids.is_snapshot_id(object_id):
                raise RecordError(f"{object_id!r} is not a snapshot ID")
        else:
            raise RecordError(f"unknown image kind {kind!r}")
        access = _require(data, "access_type", str)
        if access not in {a.value for a in AccessType}:
            raise RecordError(f"unknown access type {access!r}")
        fs_type = _require(data, "fs_type", str)
        if fs_type and fs_type not in {t.value for t in FsType}:
            raise RecordError(f"unknown filesystem type {fs_type!r}")
        size = _require(data, "size", int)
        sector = _require(data, "sector_size", int)
        if size < 0 or sector not in (512, 1024, 2048, 4096):
            raise RecordError("size or sector_size out of range")
        source_kind = data.get("source_kind", "") or ""
        if source_kind not in ("", "snapshot", "volume"):
            raise RecordError(f"unknown source kind {source_kind!r}")
        params = _string_map(data, "parameters")
        mutable = _string_map(data, "mutable_parameters")
        return ImageRecord(
            kind=kind,
            id=object_id,
            name=_require(data, "name", str),
            size=size,
            access_type=access,
            fs_type=fs_type,
            formatted=_require(data, "formatted", bool),
            sector_size=sector,
            created_at=float(_require(data, "created_at", (int, float))),
            pool_uuid=_require(data, "pool_uuid", str),
            source_kind=source_kind,
            source_id=str(data.get("source_id", "") or ""),
            parameters=params,
            format=RECORD_FORMAT,
            mutable_parameters=mutable,
        )


def _string_map(data: dict[str, Any], key: str) -> dict[str, str]:
    """An optional field mapping strings to strings (absent in older records: empty)."""
    value = data.get(key, {}) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise RecordError(f"{key} must map strings to strings")
    return dict(value)
