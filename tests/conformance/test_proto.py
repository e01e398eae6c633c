"""csi_proto/csi.proto must be the v1.12.0 wire format exactly: compile it and the upstream
definition (from the Go module proxy, as csi-sanity's build already fetches it) and compare the
descriptors field by field, ignoring only comments and the file's own name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC_MODULE = "github.com/container-storage-interface/spec@v1.12.0"


def _descriptor(include: str, proto: str) -> descriptor_pb2.FileDescriptorProto:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I",
                include,
                f"--descriptor_set_out={out}",
                proto,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as fh:
            fds.ParseFromString(fh.read())
    (fd,) = fds.file
    fd.name = "csi.proto"
    return fd


def test_proto_matches_the_v1_12_0_specification() -> None:
    info = subprocess.run(
        ["go", "mod", "download", "-json", SPEC_MODULE],
        check=True,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    spec_dir = json.loads(info.stdout)["Dir"]
    ours = _descriptor(REPO, "csi_proto/csi.proto")
    upstream = _descriptor(spec_dir, "csi.proto")
    assert ours.package == "csi.v1"
    assert [m.name for m in ours.message_type] == [m.name for m in upstream.message_type]
    assert [s.name for s in ours.service] == [s.name for s in upstream.service]
    for mine, theirs in zip(ours.message_type, upstream.message_type, strict=True):
        assert mine == theirs, f"message {mine.name} differs from the specification"
    assert ours.SerializeToString(deterministic=True) == upstream.SerializeToString(
        deterministic=True
    )
