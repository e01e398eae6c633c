"""Probe readers follow the CSI spec: an absent `ready` means ready (csi-driver-host-path sends
none); only an explicit `ready: false` means not ready."""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from csi_proto import csi_pb2
from driver.ctl.client import probe_ready


def test_absent_ready_means_ready() -> None:
    assert probe_ready(csi_pb2.ProbeResponse())


def test_explicit_answers_are_taken_as_given() -> None:
    assert probe_ready(csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True)))
    assert not probe_ready(csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False)))
