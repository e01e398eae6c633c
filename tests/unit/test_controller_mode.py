"""Controller mode over gRPC: no pool, no Kubernetes API; it serves ControllerExpandVolume (issue
14) and ControllerModifyVolume (issue 18) from the request alone, and advertises nothing else."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from csi_proto import csi_pb2
from driver.config import Config, Mode
from driver.csi import server
from driver.ctl.client import Client, mount_cap

_RPC = csi_pb2.ControllerServiceCapability.RPC
VOLUME = "v-" + "1" * 32


@pytest.fixture
def controller_mode(tmp_path: os.PathLike[str]) -> Iterator[Client]:
    sock = os.path.join(str(tmp_path), "csi.sock")
    cfg = Config(
        endpoint="unix://" + sock,
        mode=Mode.CONTROLLER,
        node_id="controller-pod",
        pool_dir=os.path.join(str(tmp_path), "no-pool-here"),
        workers=2,
    )
    running = server.start(cfg)
    client = Client(cfg.endpoint, timeout=10)
    try:
        client.wait_ready(10)
        yield client
    finally:
        client.close()
        running.stop(1)
    assert not os.path.exists(cfg.pool_dir)  # it never touched a pool


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_controller_mode_advertises_and_serves_expansion_only(controller_mode: Client) -> None:
    c = controller_mode
    caps = c.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    assert [cap.rpc.type for cap in caps.capabilities] == [
        _RPC.EXPAND_VOLUME,
        _RPC.MODIFY_VOLUME,
    ]
    plugin = c.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {p.service.type for p in plugin.capabilities if p.HasField("service")}
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in services
    resp = c.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=VOLUME,
            capacity_range=csi_pb2.CapacityRange(required_bytes=(640 << 20) + 1),
            volume_capability=mount_cap("xfs"),
        )
    )
    assert resp.capacity_bytes == 641 << 20 and resp.node_expansion_required
    assert (
        _code(
            lambda: c.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(volume_id="../../etc")
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT  # no capacity range: malformed before anything
    )


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("CreateVolume", csi_pb2.CreateVolumeRequest(name="n")),
        ("DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=VOLUME)),
        ("ListVolumes", csi_pb2.ListVolumesRequest()),
        ("GetCapacity", csi_pb2.GetCapacityRequest()),
        ("ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(volume_id=VOLUME)),
        (
            "ValidateVolumeCapabilities",
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=VOLUME),
        ),
        ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=VOLUME)),
        ("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id="s-" + "1" * 32)),
        ("ListSnapshots", csi_pb2.ListSnapshotsRequest()),
        ("GetSnapshot", csi_pb2.GetSnapshotRequest(snapshot_id="s-" + "1" * 32)),
        ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(volume_id=VOLUME)),
        ("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(volume_id=VOLUME)),
    ],
)
def test_controller_mode_answers_the_rest_unimplemented(
    controller_mode: Client, rpc: str, request_: object
) -> None:
    assert _code(lambda: getattr(controller_mode.controller, rpc)(request_)) == (
        grpc.StatusCode.UNIMPLEMENTED
    )


def test_controller_mode_has_no_node_service(controller_mode: Client) -> None:
    assert (
        _code(lambda: controller_mode.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()))
        == grpc.StatusCode.UNIMPLEMENTED
    )


@pytest.mark.parametrize(
    ("volume_id", "mutable", "code"),
    [
        (VOLUME, {"stowage.csi.io/read-iops": "1000"}, grpc.StatusCode.OK),
        (VOLUME, {"stowage.csi.io/write-bps": "50Mi"}, grpc.StatusCode.OK),
        (VOLUME, {"stowage.csi.io/read-iops": "unlimited"}, grpc.StatusCode.OK),
        (VOLUME, {}, grpc.StatusCode.OK),
        ("", {"stowage.csi.io/read-iops": "1000"}, grpc.StatusCode.INVALID_ARGUMENT),
        ("not-ours", {"stowage.csi.io/read-iops": "1000"}, grpc.StatusCode.NOT_FOUND),
        ("not-ours", {"XXX_FakeKey": "x"}, grpc.StatusCode.INVALID_ARGUMENT),
        (VOLUME, {"XXX_FakeKey": "XXX_FakeValue"}, grpc.StatusCode.INVALID_ARGUMENT),
        (VOLUME, {"fsType": "xfs"}, grpc.StatusCode.INVALID_ARGUMENT),  # immutable
        (VOLUME, {"stowage.csi.io/read-iops": "0"}, grpc.StatusCode.INVALID_ARGUMENT),
        (VOLUME, {"stowage.csi.io/read-iops": "-5"}, grpc.StatusCode.INVALID_ARGUMENT),
        (VOLUME, {"stowage.csi.io/read-iops": "lots"}, grpc.StatusCode.INVALID_ARGUMENT),
        (VOLUME, {"stowage.csi.io/read-iops": "10000001"}, grpc.StatusCode.INVALID_ARGUMENT),
        (VOLUME, {"stowage.csi.io/write-bps": "2Ti"}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_controller_mode_checks_modify_requests(
    controller_mode: Client, volume_id: str, mutable: dict[str, str], code: grpc.StatusCode
) -> None:
    """Controller mode answers from the request (the node applies the change, see
    docs/design.md): the parameters' checks are the node's own."""
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable)
    assert _code(lambda: controller_mode.controller.ControllerModifyVolume(req)) == code
