"""CSI Identity service."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_proto import csi_pb2, csi_pb2_grpc
from driver import DRIVER_NAME, __version__, faults

_Svc = csi_pb2.PluginCapability.Service
_Exp = csi_pb2.PluginCapability.VolumeExpansion


#: Served only with a pool (modes all and node): advertised only there.
POOL_SERVICES = (_Svc.GROUP_CONTROLLER_SERVICE, _Svc.SNAPSHOT_METADATA_SERVICE)


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(self, *, ready: Callable[[], bool], pool: bool) -> None:
        self._ready = ready
        self._pool = pool

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            csi_pb2.PluginCapability(service=_Svc(type=_Svc.CONTROLLER_SERVICE)),
            csi_pb2.PluginCapability(service=_Svc(type=_Svc.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            csi_pb2.PluginCapability(volume_expansion=_Exp(type=_Exp.ONLINE)),
            csi_pb2.PluginCapability(volume_expansion=_Exp(type=_Exp.OFFLINE)),
        ]
        if self._pool:
            caps += [csi_pb2.PluginCapability(service=_Svc(type=t)) for t in POOL_SERVICES]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        faults.hit("probe:answering")
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self._ready()))
