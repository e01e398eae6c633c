"""A thin typed client over the CSI socket."""

from __future__ import annotations

import time

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc

_Modes = csi_pb2.VolumeCapability.AccessMode


def mount_cap(
    fs_type: str = "",
    mode: _Modes.Mode.ValueType = _Modes.SINGLE_NODE_WRITER,
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def block_cap(
    mode: _Modes.Mode.ValueType = _Modes.SINGLE_NODE_WRITER,
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def capability(block: bool, fs_type: str = "", readonly: bool = False) -> csi_pb2.VolumeCapability:
    mode = (
        csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
        if readonly
        else csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    )
    return block_cap(mode) if block else mount_cap(fs_type, mode)


def probe_ready(resp: csi_pb2.ProbeResponse) -> bool:
    """Whether a Probe answer says ready. The CSI spec: an absent `ready` means ready (the
    plugin has nothing to report); only an explicit `ready: false` means not ready."""
    return not resp.HasField("ready") or resp.ready.value


class Client:
    def __init__(self, endpoint: str, timeout: float = 120.0) -> None:
        target = endpoint if endpoint.startswith("unix:") else endpoint.removeprefix("tcp://")
        self.channel = grpc.insecure_channel(target)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                if probe_ready(self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)):
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"driver not ready after {deadline:.0f}s: {last}")

    def node_id(self) -> str:
        return self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=self.timeout).node_id

    def create_volume(
        self,
        name: str,
        size: int,
        cap: csi_pb2.VolumeCapability,
        snapshot: str = "",
        volume: str = "",
        parameters: dict[str, str] | None = None,
    ) -> csi_pb2.Volume:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[cap],
            parameters=parameters or {},
        )
        if snapshot:
            req.volume_content_source.snapshot.snapshot_id = snapshot
        elif volume:
            req.volume_content_source.volume.volume_id = volume
        return self.controller.CreateVolume(req, timeout=self.timeout).volume

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=self.timeout
        )

    def expand_volume(self, volume_id: str, size: int) -> int:
        return self.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)
            ),
            timeout=self.timeout,
        ).capacity_bytes

    def modify_volume(self, volume_id: str, mutable: dict[str, str]) -> None:
        self.controller.ControllerModifyVolume(
            csi_pb2.ControllerModifyVolumeRequest(
                volume_id=volume_id, mutable_parameters=mutable
            ),
            timeout=self.timeout,
        )

    def list_volumes(self) -> list[csi_pb2.ListVolumesResponse.Entry]:
        out: list[csi_pb2.ListVolumesResponse.Entry] = []
        token = ""
        while True:
            resp = self.controller.ListVolumes(
                csi_pb2.ListVolumesRequest(max_entries=500, starting_token=token),
                timeout=self.timeout,
            )
            out.extend(resp.entries)
            token = resp.next_token
            if not token:
                return out

    def create_snapshot(
        self, name: str, volume_id: str, parameters: dict[str, str] | None = None
    ) -> csi_pb2.Snapshot:
        return self.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(
                name=name, source_volume_id=volume_id, parameters=parameters or {}
            ),
            timeout=self.timeout,
        ).snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=self.timeout
        )

    def list_snapshots(self) -> list[csi_pb2.ListSnapshotsResponse.Entry]:
        out: list[csi_pb2.ListSnapshotsResponse.Entry] = []
        token = ""
        while True:
            resp = self.controller.ListSnapshots(
                csi_pb2.ListSnapshotsRequest(max_entries=500, starting_token=token),
                timeout=self.timeout,
            )
            out.extend(resp.entries)
            token = resp.next_token
            if not token:
                return out

    def stage(
        self,
        volume_id: str,
        staging: str,
        cap: csi_pb2.VolumeCapability,
        context: dict[str, str] | None = None,
    ) -> None:
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=cap,
                volume_context=context or {},
            ),
            timeout=self.timeout,
        )

    def unstage(self, volume_id: str, staging: str) -> None:
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
            timeout=self.timeout,
        )

    def publish(
        self,
        volume_id: str,
        staging: str,
        target: str,
        cap: csi_pb2.VolumeCapability,
        readonly: bool = False,
        context: dict[str, str] | None = None,
    ) -> None:
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap,
                readonly=readonly,
                volume_context=context or {},
            ),
            timeout=self.timeout,
        )

    def unpublish(self, volume_id: str, target: str) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
            timeout=self.timeout,
        )

    def stats(self, volume_id: str, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path),
            timeout=self.timeout,
        )

    def node_expand(self, volume_id: str, path: str, size: int) -> int:
        return self.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=volume_id,
                volume_path=path,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            ),
            timeout=self.timeout,
        ).capacity_bytes
