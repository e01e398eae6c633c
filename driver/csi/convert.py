"""Protobuf <-> domain conversion. No decisions here beyond shape."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from csi_proto import csi_pb2
from driver import (
    CONTEXT_ACCESS_TYPE,
    CONTEXT_FS_TYPE,
    CONTEXT_NODE,
    CONTEXT_POD_UID,
    CONTEXT_POOL_UUID,
    TOPOLOGY_KEY,
)
from driver.errors import InvalidArgument
from driver.model import (
    AccessMode,
    AccessType,
    Capability,
    CapacityRange,
    Condition,
    ContentSource,
    GroupSnapshot,
    Snapshot,
    Volume,
    VolumeStats,
)


def capability(cap: csi_pb2.VolumeCapability) -> Capability:
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument("volume_capability.access_type (mount or block) is required")
    if not cap.HasField("access_mode"):
        raise InvalidArgument("volume_capability.access_mode is required")
    try:
        mode = AccessMode(cap.access_mode.mode)
    except ValueError as exc:
        raise InvalidArgument(f"unknown access mode {cap.access_mode.mode}") from exc
    if kind == "block":
        return Capability(AccessType.BLOCK, mode)
    return Capability(
        AccessType.MOUNT,
        mode,
        fs_type=cap.mount.fs_type,
        mount_flags=tuple(cap.mount.mount_flags),
        mount_group=cap.mount.volume_mount_group,
    )


def capabilities(caps: Iterable[csi_pb2.VolumeCapability]) -> list[Capability]:
    return [capability(c) for c in caps]


def capacity_range(has: bool, rng: csi_pb2.CapacityRange) -> CapacityRange:
    return CapacityRange(rng.required_bytes, rng.limit_bytes) if has else CapacityRange()


def content_source(has: bool, src: csi_pb2.VolumeContentSource) -> ContentSource | None:
    if not has:
        return None
    kind = src.WhichOneof("type")
    if kind == "snapshot":
        if not src.snapshot.snapshot_id:
            raise InvalidArgument("volume_content_source.snapshot.snapshot_id is required")
        return ContentSource("snapshot", src.snapshot.snapshot_id)
    if kind == "volume":
        if not src.volume.volume_id:
            raise InvalidArgument("volume_content_source.volume.volume_id is required")
        return ContentSource("volume", src.volume.volume_id)
    raise InvalidArgument("volume_content_source names neither a snapshot nor a volume")


def segments(topologies: Iterable[csi_pb2.Topology]) -> list[dict[str, str]]:
    return [dict(t.segments) for t in topologies]


def topology(node_id: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node_id})


def volume(vol: Volume, node_id: str, pool_uuid: str = "") -> csi_pb2.Volume:
    out = csi_pb2.Volume(
        volume_id=vol.id,
        capacity_bytes=vol.size,
        volume_context=volume_context(vol, node_id, pool_uuid),
        accessible_topology=[topology(node_id)],
    )
    if vol.source is not None:
        if vol.source.kind == "snapshot":
            out.content_source.snapshot.snapshot_id = vol.source.id
        else:
            out.content_source.volume.volume_id = vol.source.id
    return out


def volume_context(vol: Volume, node_id: str, pool_uuid: str = "") -> dict[str, str]:
    ctx = {CONTEXT_NODE: node_id, CONTEXT_ACCESS_TYPE: vol.access_type.value}
    if vol.fs_type:
        ctx[CONTEXT_FS_TYPE] = str(vol.fs_type)
    if pool_uuid:
        ctx[CONTEXT_POOL_UUID] = pool_uuid
    return ctx


def pool_uuid(volume_context: Mapping[str, str]) -> str:
    """The pool a volume context names ("" for volumes made before pools had an identity)."""
    return volume_context.get(CONTEXT_POOL_UUID, "")


def pod_uid(volume_context: Mapping[str, str]) -> str:
    """The pod a NodePublishVolume is for, with CSIDriver podInfoOnMount ("" without)."""
    return volume_context.get(CONTEXT_POD_UID, "")


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def snapshot(snap: Snapshot) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        snapshot_id=snap.id,
        source_volume_id=snap.source_volume_id,
        size_bytes=snap.size,
        creation_time=timestamp(snap.created_at),
        ready_to_use=snap.ready,
        group_snapshot_id=snap.group_id,
    )


def group_snapshot(group: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=group.id,
        snapshots=[snapshot(s) for s in group.snapshots],
        creation_time=timestamp(group.created_at),
        ready_to_use=group.ready,
    )


def condition(cond: Condition) -> csi_pb2.VolumeCondition:
    return csi_pb2.VolumeCondition(abnormal=cond.abnormal, message=cond.message)


def stats(st: VolumeStats) -> csi_pb2.NodeGetVolumeStatsResponse:
    usage = [
        csi_pb2.VolumeUsage(
            unit=csi_pb2.VolumeUsage.BYTES,
            total=st.total_bytes,
            used=st.used_bytes,
            available=st.available_bytes,
        )
    ]
    if st.total_inodes is not None:
        usage.append(
            csi_pb2.VolumeUsage(
                unit=csi_pb2.VolumeUsage.INODES,
                total=st.total_inodes,
                used=st.used_inodes or 0,
                available=st.available_inodes or 0,
            )
        )
    return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition(st.condition))


def controller_capabilities(
    types: Iterable[csi_pb2.ControllerServiceCapability.RPC.Type.ValueType],
) -> csi_pb2.ControllerGetCapabilitiesResponse:
    return csi_pb2.ControllerGetCapabilitiesResponse(
        capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=t))
            for t in types
        ]
    )
