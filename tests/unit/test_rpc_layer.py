"""Secrets redaction, the error→code table, and proto conversion."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from csi_proto import csi_pb2
from driver import errors
from driver.csi import convert, status
from driver.csi.redact import MASK, loggable, redact
from driver.model import AccessMode, AccessType, Capability, CapacityRange, ContentSource

CANARY = "hunter2-CANARY-7f3a"


def _walk(d: Descriptor) -> Iterator[Descriptor]:
    yield d
    for n in d.nested_types:
        yield from _walk(n)


def _all_messages() -> list[Descriptor]:
    return [
        d
        for top in csi_pb2.DESCRIPTOR.message_types_by_name.values()
        for d in _walk(top)
        if not d.GetOptions().map_entry
    ]


def _is_secret(f: FieldDescriptor) -> bool:
    return bool(f.GetOptions().Extensions[csi_pb2.csi_secret])


SECRET_FIELDS = sorted(
    (d.full_name, f.name) for d in _all_messages() for f in d.fields if _is_secret(f)
)


def test_secret_fields_found() -> None:
    names = {m for m, _ in SECRET_FIELDS}
    for expected in (
        "csi.v1.CreateVolumeRequest",
        "csi.v1.DeleteVolumeRequest",
        "csi.v1.NodeStageVolumeRequest",
        "csi.v1.NodePublishVolumeRequest",
        "csi.v1.ControllerPublishVolumeRequest",
        "csi.v1.CreateSnapshotRequest",
        "csi.v1.NodeExpandVolumeRequest",
        "csi.v1.ControllerExpandVolumeRequest",
    ):
        assert expected in names
    assert len(SECRET_FIELDS) >= 15


def _message_class(full_name: str) -> type:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)


def _fill(msg: Any, field: FieldDescriptor, value: str) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        getattr(msg, field.name)["user"] = value
        getattr(msg, field.name)["password"] = value
    elif field.type == FieldDescriptor.TYPE_STRING:
        if field.is_repeated:
            getattr(msg, field.name).append(value)
        else:
            setattr(msg, field.name, value)
    else:  # pragma: no cover - the CSI proto has only map and string secrets
        raise AssertionError(f"unexpected secret field shape {field.full_name}")


@pytest.mark.parametrize(("message", "field"), SECRET_FIELDS)
def test_every_secret_field_is_masked(message: str, field: str) -> None:
    cls = _message_class(message)
    msg = cls()
    desc = cls.DESCRIPTOR
    _fill(msg, desc.fields_by_name[field], CANARY)
    visible = None
    for f in desc.fields:  # one ordinary string field must stay visible
        if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated and not _is_secret(f):
            setattr(msg, f.name, "visible-marker")
            visible = f.name
            break
    for f in desc.fields:  # and ordinary maps keep their values
        if (
            not _is_secret(f)
            and f.message_type is not None
            and f.message_type.GetOptions().map_entry
            and f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING
        ):
            getattr(msg, f.name)["plain"] = "plain-value"
    line = loggable(msg)
    assert CANARY not in line
    assert MASK in line
    assert "not loggable" not in line
    if visible:
        assert "visible-marker" in line
    if "plain" in str(msg):
        assert "plain-value" in line
    assert CANARY in str(msg)  # redaction works on a copy
    red = redact(msg)
    assert CANARY not in str(red)


def test_nested_requests_are_redacted_and_shown() -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id="v-" + "1" * 32,
        staging_target_path="/k/s",
        secrets={"token": CANARY},
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs", mount_flags=["noatime"]),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1),
        ),
        publish_context={"stowage.csi.io/fs-type": "xfs"},
    )
    line = loggable(req)
    assert CANARY not in line
    for shown in ("v-" + "1" * 32, "/k/s", "noatime", "xfs", "token"):
        assert shown in line
    assert "\n" not in line


def test_unloggable_message_shows_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from driver.csi import redact as redact_mod

    def boom(msg: Any) -> Any:
        raise RuntimeError("unexpected shape")

    monkeypatch.setattr(redact_mod, "redact", boom)
    req = csi_pb2.CreateVolumeRequest(name="n", secrets={"k": CANARY})
    assert redact_mod.loggable(req) == "<CreateVolumeRequest: not loggable>"


# --- status.code_for ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (errors.Aborted("x"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.Internal("x"), grpc.StatusCode.INTERNAL),
        (errors.CommandFailed(["mkfs"], 1, "", "e"), grpc.StatusCode.INTERNAL),
        (errors.StowageError("x"), grpc.StatusCode.INTERNAL),
        (ValueError("x"), grpc.StatusCode.INTERNAL),
        (KeyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_code_for(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status.code_for(exc) is code


def test_every_domain_error_has_a_distinct_code() -> None:
    leaves = [
        c
        for c in vars(errors).values()
        if isinstance(c, type)
        and issubclass(c, errors.StowageError)
        and c not in (errors.StowageError, errors.CommandFailed)
    ]
    codes = {status.code_for(c("x")) for c in leaves}
    assert len(codes) == len(leaves)
    assert grpc.StatusCode.OK not in codes and grpc.StatusCode.UNKNOWN not in codes


def test_command_failed_message() -> None:
    e = errors.CommandFailed(["mkfs.xfs", "-f", "/dev/loop1"], 1, "out", "x" * 1000 + "tail")
    assert str(e).startswith("mkfs.xfs exited with status 1: ")
    assert str(e).endswith("tail") and len(str(e)) < 500
    assert e.argv == ["mkfs.xfs", "-f", "/dev/loop1"]


# --- convert --------------------------------------------------------------------------------------
def _vc(**kw: Any) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(**kw)


def test_capability_missing_access_type_or_mode() -> None:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=1)
    with pytest.raises(errors.InvalidArgument):
        convert.capability(_vc(access_mode=mode))
    with pytest.raises(errors.InvalidArgument):
        convert.capability(_vc(block=csi_pb2.VolumeCapability.BlockVolume()))
    with pytest.raises(errors.InvalidArgument):
        convert.capability(
            _vc(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=99),
            )
        )


def test_capability_conversion() -> None:
    blk = convert.capability(
        _vc(
            block=csi_pb2.VolumeCapability.BlockVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=7),
        )
    )
    assert blk == Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_MULTI_WRITER)
    mnt = convert.capability(
        _vc(
            mount=csi_pb2.VolumeCapability.MountVolume(
                fs_type="xfs", mount_flags=["noatime", "ro"], volume_mount_group="1000"
            ),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=2),
        )
    )
    assert mnt == Capability(
        AccessType.MOUNT, AccessMode.SINGLE_NODE_READER_ONLY, "xfs", ("noatime", "ro"), "1000"
    )
    empty_mount = convert.capability(
        _vc(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(),
        )
    )
    assert empty_mount == Capability(AccessType.MOUNT, AccessMode.UNKNOWN)


def test_content_source_and_ranges() -> None:
    assert convert.content_source(False, csi_pb2.VolumeContentSource()) is None
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s-1")
    )
    assert convert.content_source(True, src) == ContentSource("snapshot", "s-1")
    src = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="v-1")
    )
    assert convert.content_source(True, src) == ContentSource("volume", "v-1")
    for bad in (
        csi_pb2.VolumeContentSource(),
        csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource()),
        csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource()),
    ):
        with pytest.raises(errors.InvalidArgument):
            convert.content_source(True, bad)
    rng = csi_pb2.CapacityRange(required_bytes=5, limit_bytes=9)
    assert convert.capacity_range(True, rng) == CapacityRange(5, 9)
    assert convert.capacity_range(False, rng) == CapacityRange()
