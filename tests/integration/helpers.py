from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import grpc

from driver.ctl.client import Client, capability

MiB = 1 << 20


def write_random(path: str, mib: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(mib):
            chunk = os.urandom(MiB)
            h.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


class Mounted:
    """Stage + publish a volume under a test directory; undo in reverse."""

    def __init__(
        self,
        client: Client,
        base: str,
        volume_id: str,
        *,
        block: bool = False,
        fs_type: str = "",
        readonly: bool = False,
        tag: str = "",
    ) -> None:
        self.client = client
        self.volume_id = volume_id
        self.cap = capability(block, fs_type)
        self.staging = os.path.join(base, f"staging-{tag or volume_id}")
        self.target = os.path.join(base, f"target-{tag or volume_id}")
        self.readonly = readonly
        os.makedirs(self.staging, exist_ok=True)

    def up(self) -> Mounted:
        self.client.stage(self.volume_id, self.staging, self.cap)
        self.client.publish(self.volume_id, self.staging, self.target, self.cap, self.readonly)
        return self

    def down(self) -> None:
        self.client.unpublish(self.volume_id, self.target)
        self.client.unstage(self.volume_id, self.staging)

    def __enter__(self) -> Mounted:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def status_code(call: Callable[[], object]) -> grpc.StatusCode:
    """The gRPC code a call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
