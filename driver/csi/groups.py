"""CSI GroupController service: validate -> core -> convert (group snapshots, see
driver/core/groups.py)."""

from __future__ import annotations

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.core.groups import GroupCore
from driver.csi import convert

_RPC = csi_pb2.GroupControllerServiceCapability.RPC

CAPABILITIES = (_RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,)


class GroupControllerServicer(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, core: GroupCore) -> None:
        self._core = core

    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.GroupControllerServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES
            ]
        )

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        group = self._core.create(
            request.name, list(request.source_volume_ids), dict(request.parameters)
        )
        return csi_pb2.CreateVolumeGroupSnapshotResponse(
            group_snapshot=convert.group_snapshot(group)
        )

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        self._core.delete(request.group_snapshot_id, list(request.snapshot_ids))
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        group = self._core.get(request.group_snapshot_id, list(request.snapshot_ids))
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=convert.group_snapshot(group))
