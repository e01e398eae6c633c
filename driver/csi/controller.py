"""CSI Controller service: validate -> lock -> backend (in driver.core) -> convert."""

from __future__ import annotations

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.core.controller import ControllerCore, VolumeStatus
from driver.csi import convert
from driver.errors import Unimplemented
from driver.validation import present

_RPC = csi_pb2.ControllerServiceCapability.RPC

CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME,
    _RPC.PUBLISH_UNPUBLISH_VOLUME,
    _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_SNAPSHOTS,
    _RPC.CLONE_VOLUME,
    _RPC.PUBLISH_READONLY,
    _RPC.EXPAND_VOLUME,
    _RPC.LIST_VOLUMES_PUBLISHED_NODES,
    _RPC.VOLUME_CONDITION,
    _RPC.GET_VOLUME,
    _RPC.SINGLE_NODE_MULTI_WRITER,
    _RPC.GET_SNAPSHOT,
)


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, core: ControllerCore) -> None:
        self.core = core

    @property
    def _node(self) -> str:
        return self.core.ctx.node_id

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return convert.controller_capabilities(CAPABILITIES)

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        req = request.accessibility_requirements
        vol = self.core.create_volume(
            name=request.name,
            caps=convert.capabilities(request.volume_capabilities),
            rng=convert.capacity_range(request.HasField("capacity_range"), request.capacity_range),
            parameters=dict(request.parameters),
            source=convert.content_source(
                request.HasField("volume_content_source"), request.volume_content_source
            ),
            requisite=convert.segments(req.requisite),
            preferred=convert.segments(req.preferred),
        )
        return csi_pb2.CreateVolumeResponse(
            volume=convert.volume(vol, self._node, self.core.ctx.pool_uuid)
        )

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        self.core.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        present(
            volume_id=request.volume_id,
            node_id=request.node_id,
            volume_capability=request.HasField("volume_capability"),
        )
        cap = convert.required_capability(
            request.HasField("volume_capability"), request.volume_capability
        )
        ctx = self.core.publish(request.volume_id, request.node_id, cap, request.readonly)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=ctx)

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        self.core.unpublish(request.volume_id, request.node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        present(volume_id=request.volume_id, volume_capabilities=len(request.volume_capabilities))
        caps = convert.capabilities(request.volume_capabilities)
        reason = self.core.validate_capabilities(request.volume_id, caps, dict(request.parameters))
        if reason:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters,
            )
        )

    def _entry_status(
        self, st: VolumeStatus
    ) -> tuple[csi_pb2.Volume, list[str], csi_pb2.VolumeCondition]:
        return (
            convert.volume(st.volume, self._node, self.core.ctx.pool_uuid),
            st.published_nodes,
            convert.condition(st.condition),
        )

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        page = self.core.list_volumes(request.max_entries, request.starting_token)
        entries = []
        for st in page.items:
            vol, nodes, cond = self._entry_status(st)
            entries.append(
                csi_pb2.ListVolumesResponse.Entry(
                    volume=vol,
                    status=csi_pb2.ListVolumesResponse.VolumeStatus(
                        published_node_ids=nodes, volume_condition=cond
                    ),
                )
            )
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=page.next_token)

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        vol, nodes, cond = self._entry_status(self.core.volume_status(request.volume_id))
        return csi_pb2.ControllerGetVolumeResponse(
            volume=vol,
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=nodes, volume_condition=cond
            ),
        )

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        segment = (
            dict(request.accessible_topology.segments)
            if request.HasField("accessible_topology")
            else None
        )
        available, maximum = self.core.capacity(
            convert.capabilities(request.volume_capabilities), segment
        )
        resp = csi_pb2.GetCapacityResponse(available_capacity=available)
        resp.maximum_volume_size.value = maximum
        return resp

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        snap = self.core.create_snapshot(
            request.name, request.source_volume_id, dict(request.parameters)
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=convert.snapshot(snap))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        self.core.delete_snapshot(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        page = self.core.list_snapshots(
            request.max_entries,
            request.starting_token,
            request.snapshot_id,
            request.source_volume_id,
        )
        return csi_pb2.ListSnapshotsResponse(
            entries=[
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=convert.snapshot(s))
                for s in page.items
            ],
            next_token=page.next_token,
        )

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        return csi_pb2.GetSnapshotResponse(
            snapshot=convert.snapshot(self.core.get_snapshot(request.snapshot_id))
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        present(volume_id=request.volume_id, capacity_range=request.HasField("capacity_range"))
        size, node_required = self.core.expand_volume(
            request.volume_id,
            convert.capacity_range(request.HasField("capacity_range"), request.capacity_range)
            if request.HasField("capacity_range")
            else None,
        )
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=node_required
        )

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        raise Unimplemented("ControllerModifyVolume is not supported yet")
