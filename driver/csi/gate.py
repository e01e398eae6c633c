"""CSI Controller service in controller mode (no pool): attach gate, validation, expansion gate."""

from __future__ import annotations

from typing import Any

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.core.gate import Catalog, GateCore
from driver.csi import convert
from driver.errors import Unimplemented
from driver.validation import present

_RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    _RPC.PUBLISH_UNPUBLISH_VOLUME,
    _RPC.EXPAND_VOLUME,
    _RPC.GET_VOLUME,
    _RPC.PUBLISH_READONLY,
)


class GateServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.core = GateCore(catalog)

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return convert.controller_capabilities(CAPABILITIES)

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        present(
            volume_id=request.volume_id,
            node_id=request.node_id,
            volume_capability=request.HasField("volume_capability"),
        )
        cap = convert.capability(request.volume_capability)
        ctx = self.core.publish(request.volume_id, request.node_id, cap, request.readonly)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=ctx)

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        present(volume_id=request.volume_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        present(volume_id=request.volume_id, volume_capabilities=len(request.volume_capabilities))
        reason = self.core.validate(
            request.volume_id, convert.capabilities(request.volume_capabilities)
        )
        if reason:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_capabilities=request.volume_capabilities,
                volume_context=request.volume_context,
                parameters=request.parameters,
            )
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        present(volume_id=request.volume_id, capacity_range=request.HasField("capacity_range"))
        size = self.core.expand(
            request.volume_id, convert.capacity_range(True, request.capacity_range)
        )
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=True
        )

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        present(volume_id=request.volume_id)
        ref = self.core.volume(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=csi_pb2.Volume(
                volume_id=ref.volume_id,
                capacity_bytes=ref.size,
                accessible_topology=[convert.topology(ref.node_id)],
            ),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(),
        )

    # Provisioning, snapshots and capacity are node-local: in a cluster the node plugin serves
    # them (csi-provisioner and csi-snapshotter run with --node-deployment), so controller mode
    # does not advertise them and answers UNIMPLEMENTED.
    def CreateVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("CreateVolume")

    def DeleteVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("DeleteVolume")

    def ListVolumes(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("ListVolumes")

    def GetCapacity(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("GetCapacity")

    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("CreateSnapshot")

    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("DeleteSnapshot")

    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("ListSnapshots")

    def GetSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise _node_only("GetSnapshot")

    def ControllerModifyVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented("ControllerModifyVolume is not supported yet")


def _node_only(method: str) -> Unimplemented:
    return Unimplemented(
        f"{method} is served by the node plugin (--mode node), not by controller mode"
    )
