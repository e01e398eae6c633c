"""CSI Controller service, one implementation for every mode: validate -> core -> convert.

With a pool (modes `all` and `node`) it serves everything; without one (mode `controller`) it
serves ControllerExpandVolume and ControllerModifyVolume, answered from the request's own
fields by the same code in every mode (the node that holds the volume grows it, or applies the
new parameters), and, when given backup targets, the node-independent snapshot RPCs on backup
snapshots (`driver.core.remote`: delete, get, list; CreateSnapshot is refused), and advertises
nothing else. There is no ControllerPublish/Unpublish:
Stowage volumes are node-local and need no attach (CSIDriver `attachRequired: false`, see
docs/design.md).
"""

from __future__ import annotations

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.core.controller import ControllerCore, VolumeStatus, expand_request
from driver.core.modify import IoLimitsCore, modify_request
from driver.core.remote import RemoteBackups
from driver.csi import convert
from driver.errors import Unimplemented

_RPC = csi_pb2.ControllerServiceCapability.RPC

# Served without a pool, so in every mode (controller mode answers from the request; the node
# holding the volume grows it, or applies the modified parameters: docs/design.md).
POOLLESS_CAPABILITIES = (_RPC.EXPAND_VOLUME, _RPC.MODIFY_VOLUME)
# Served without a pool when controller mode has the backup targets (`RemoteBackups`).
REMOTE_CAPABILITIES = (
    *POOLLESS_CAPABILITIES,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_SNAPSHOTS,
    _RPC.GET_SNAPSHOT,
)
CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME,
    _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_SNAPSHOTS,
    _RPC.CLONE_VOLUME,
    *POOLLESS_CAPABILITIES,
    _RPC.VOLUME_CONDITION,
    _RPC.GET_VOLUME,
    _RPC.SINGLE_NODE_MULTI_WRITER,
    _RPC.GET_SNAPSHOT,
)


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(
        self,
        core: ControllerCore | None,
        limits: IoLimitsCore | None = None,
        remote: RemoteBackups | None = None,
    ) -> None:
        """`core` and `limits` are None in controller mode, which has no pool; `remote` is given
        there when backup targets are configured."""
        self._core = core
        self._limits = limits
        self._remote = remote

    def _snapshots(self, method: str) -> ControllerCore | RemoteBackups:
        if self._core is None and self._remote is not None:
            return self._remote
        return self._pool(method)

    def _pool(self, method: str) -> ControllerCore:
        if self._core is None:
            raise Unimplemented(
                f"{method} is served by the node plugin (--mode node), not by controller mode"
            )
        return self._core

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        if self._core is not None:
            return convert.controller_capabilities(CAPABILITIES)
        return convert.controller_capabilities(
            REMOTE_CAPABILITIES if self._remote is not None else POOLLESS_CAPABILITIES
        )

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        core = self._pool("CreateVolume")
        req = request.accessibility_requirements
        vol = core.create_volume(
            name=request.name,
            caps=convert.capabilities(request.volume_capabilities),
            rng=convert.capacity_range(request.HasField("capacity_range"), request.capacity_range),
            parameters=dict(request.parameters),
            source=convert.content_source(
                request.HasField("volume_content_source"), request.volume_content_source
            ),
            requisite=convert.segments(req.requisite),
            preferred=convert.segments(req.preferred),
            mutable=dict(request.mutable_parameters),
        )
        return csi_pb2.CreateVolumeResponse(
            volume=convert.volume(vol, core.ctx.node_id, core.ctx.pool_uuid)
        )

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        self._pool("DeleteVolume").delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise _no_attach("ControllerPublishVolume")

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise _no_attach("ControllerUnpublishVolume")

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        core = self._pool("ValidateVolumeCapabilities")
        caps = convert.capabilities(request.volume_capabilities)
        reason = core.validate_capabilities(request.volume_id, caps, dict(request.parameters))
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

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        core = self._pool("ListVolumes")
        page = core.list_volumes(request.max_entries, request.starting_token)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=convert.volume(st.volume, core.ctx.node_id, core.ctx.pool_uuid),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    volume_condition=convert.condition(st.condition)
                ),
            )
            for st in page.items
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=page.next_token)

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        core = self._pool("ControllerGetVolume")
        st: VolumeStatus = core.volume_status(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=convert.volume(st.volume, core.ctx.node_id, core.ctx.pool_uuid),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=convert.condition(st.condition)
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
        available, maximum = self._pool("GetCapacity").capacity(
            convert.capabilities(request.volume_capabilities), segment
        )
        resp = csi_pb2.GetCapacityResponse(available_capacity=available)
        resp.maximum_volume_size.value = maximum
        return resp

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        if self._core is None and self._remote is not None:
            snap = self._remote.create_snapshot(request.name, request.source_volume_id)
        else:
            snap = self._pool("CreateSnapshot").create_snapshot(
                request.name, request.source_volume_id, dict(request.parameters)
            )
        return csi_pb2.CreateSnapshotResponse(snapshot=convert.snapshot(snap))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        self._snapshots("DeleteSnapshot").delete_snapshot(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        page = self._snapshots("ListSnapshots").list_snapshots(
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
            snapshot=convert.snapshot(
                self._snapshots("GetSnapshot").get_snapshot(request.snapshot_id)
            )
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        size = expand_request(
            request.volume_id,
            convert.capacity_range(True, request.capacity_range)
            if request.HasField("capacity_range")
            else None,
            convert.capability(request.volume_capability)
            if request.HasField("volume_capability")
            else None,
        )
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=True
        )

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        mutable = dict(request.mutable_parameters)
        if self._limits is None:
            modify_request(request.volume_id, mutable)
        else:
            self._limits.modify(request.volume_id, mutable)
        return csi_pb2.ControllerModifyVolumeResponse()


def _no_attach(method: str) -> Unimplemented:
    return Unimplemented(
        f"{method} is not served: Stowage volumes are node-local and need no attach "
        "(CSIDriver attachRequired: false)"
    )
