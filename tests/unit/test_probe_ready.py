"""Probe readers follow the CSI spec: an absent `ready` means ready (csi-driver-host-path sends
none); only an explicit `ready: false` means not ready."""

from __future__ import annotations

import pathlib
import threading
from concurrent import futures

import grpc
from google.protobuf import wrappers_pb2

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.ctl import main as ctl_main
from driver.ctl.client import probe_ready


def test_absent_ready_means_ready() -> None:
    assert probe_ready(csi_pb2.ProbeResponse())


def test_explicit_answers_are_taken_as_given() -> None:
    assert probe_ready(csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True)))
    assert not probe_ready(csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False)))


def test_wait_waits_for_the_socket_to_appear(tmp_path: pathlib.Path) -> None:
    """`stowagectl wait` is what scripts run right after starting the driver: a socket that does
    not exist yet is something to wait for, not an error (make run depends on it)."""
    sock = tmp_path / "csi.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

    class Identity(csi_pb2_grpc.IdentityServicer):
        def Probe(self, request: object, context: object) -> csi_pb2.ProbeResponse:
            return csi_pb2.ProbeResponse()  # no `ready`: ready, per the spec

    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)

    def start() -> None:  # grpc makes the socket file when it binds
        server.add_insecure_port(f"unix://{sock}")
        server.start()

    starter = threading.Timer(0.5, start)
    starter.start()
    try:
        assert ctl_main.main(["--endpoint", f"unix://{sock}", "--timeout", "20s", "wait"]) == 0
    finally:
        starter.cancel()
        server.stop(None)


def test_wait_gives_up_after_its_timeout(tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "never.sock"
    assert ctl_main.main(["--endpoint", f"unix://{sock}", "--timeout", "1s", "wait"]) != 0
