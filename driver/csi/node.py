"""CSI Node service: validate -> lock -> backend (in driver.core) -> convert."""

from __future__ import annotations

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.core.node import NodeCore
from driver.csi import convert
from driver.validation import present

_RPC = csi_pb2.NodeServiceCapability.RPC

CAPABILITIES = (
    _RPC.STAGE_UNSTAGE_VOLUME,
    _RPC.GET_VOLUME_STATS,
    _RPC.EXPAND_VOLUME,
    _RPC.VOLUME_CONDITION,
    _RPC.SINGLE_NODE_MULTI_WRITER,
    _RPC.VOLUME_MOUNT_GROUP,
)


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, core: NodeCore) -> None:
        self.core = core

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=t))
                for t in CAPABILITIES
            ]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        node = self.core.ctx.node_id
        return csi_pb2.NodeGetInfoResponse(
            node_id=node,
            max_volumes_per_node=self.core.ctx.max_volumes_per_node,
            accessible_topology=convert.topology(node),
        )

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        present(
            volume_id=request.volume_id,
            staging_target_path=request.staging_target_path,
            volume_capability=request.HasField("volume_capability"),
        )
        cap = convert.capability(request.volume_capability)
        self.core.stage(
            request.volume_id,
            request.staging_target_path,
            cap,
            convert.pool_uuid(request.volume_context),
        )
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        present(volume_id=request.volume_id, staging_target_path=request.staging_target_path)
        self.core.unstage(request.volume_id, request.staging_target_path)
        return csi_pb2.NodeUnstageVolumeResponse()

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        present(
            volume_id=request.volume_id,
            staging_target_path=request.staging_target_path,
            target_path=request.target_path,
            volume_capability=request.HasField("volume_capability"),
        )
        cap = convert.capability(request.volume_capability)
        self.core.publish(
            request.volume_id,
            request.staging_target_path,
            request.target_path,
            cap,
            request.readonly,
            convert.pool_uuid(request.volume_context),
            convert.pod_uid(request.volume_context),
        )
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        present(volume_id=request.volume_id, target_path=request.target_path)
        self.core.unpublish(request.volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        return convert.stats(self.core.stats(request.volume_id, request.volume_path))

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        size = self.core.expand(
            request.volume_id,
            request.volume_path,
            convert.capacity_range(True, request.capacity_range)
            if request.HasField("capacity_range")
            else None,
        )
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)
