"""`stowagectl demo`: one volume's life, end to end, each step timed."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import TypeVar

from driver.ctl.client import Client, capability
from driver.model import MiB

T = TypeVar("T")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(
    client: Client,
    workdir: str,
    *,
    fs_type: str = "ext4",
    data_mib: int = 64,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Create → stage → publish → write → snapshot → restore → verify → clean up."""
    timings: dict[str, float] = {}
    cleanup: list[tuple[str, Callable[[], None]]] = []
    suffix = os.urandom(4).hex()

    def step(label: str, fn: Callable[[], T]) -> T:
        started = time.monotonic()
        result = fn()
        took = time.monotonic() - started
        timings[label] = took
        echo(f"  {label:<38} {took * 1000:8.1f} ms")
        return result

    os.makedirs(workdir, exist_ok=True)
    cap = capability(False, fs_type)
    paths = {k: os.path.join(workdir, f"{k}-{suffix}") for k in ("stage-a", "stage-b", "pub-b")}
    for p in (paths["stage-a"], paths["stage-b"]):
        os.makedirs(p, exist_ok=True)
    target_a = os.path.join(workdir, f"pub-a-{suffix}")
    echo(f"stowage demo: {fs_type} volume, {data_mib} MiB of data, node {client.node_id()}")
    try:
        vol = step(
            "CreateVolume 1 GiB", lambda: client.create_volume(f"demo-{suffix}", 1024 * MiB, cap)
        )
        cleanup.append(("DeleteVolume source", lambda: client.delete_volume(vol.volume_id)))
        step(
            "NodeStageVolume (mkfs + mount)",
            lambda: client.stage(vol.volume_id, paths["stage-a"], cap),
        )
        cleanup.append(
            ("NodeUnstageVolume source", lambda: client.unstage(vol.volume_id, paths["stage-a"]))
        )
        step(
            "NodePublishVolume",
            lambda: client.publish(vol.volume_id, paths["stage-a"], target_a, cap),
        )
        cleanup.append(
            ("NodeUnpublishVolume source", lambda: client.unpublish(vol.volume_id, target_a))
        )

        data = os.path.join(target_a, "data.bin")

        def write() -> str:
            with open(data, "wb") as fh:
                for _ in range(data_mib):
                    fh.write(os.urandom(MiB))
                fh.flush()
                os.fsync(fh.fileno())
            return _sha256(data)

        digest = step(f"write {data_mib} MiB + fsync", write)
        echo(f"    sha256 {digest}")
        snap = step(
            "CreateSnapshot (frozen reflink)",
            lambda: client.create_snapshot(f"demo-snap-{suffix}", vol.volume_id),
        )
        cleanup.append(("DeleteSnapshot", lambda: client.delete_snapshot(snap.snapshot_id)))
        restored = step(
            "CreateVolume from snapshot",
            lambda: client.create_volume(
                f"demo-restore-{suffix}", 1024 * MiB, cap, snapshot=snap.snapshot_id
            ),
        )
        cleanup.append(("DeleteVolume restored", lambda: client.delete_volume(restored.volume_id)))
        step(
            "NodeStageVolume restored",
            lambda: client.stage(restored.volume_id, paths["stage-b"], cap),
        )
        cleanup.append(
            (
                "NodeUnstageVolume restored",
                lambda: client.unstage(restored.volume_id, paths["stage-b"]),
            )
        )
        step(
            "NodePublishVolume restored",
            lambda: client.publish(restored.volume_id, paths["stage-b"], paths["pub-b"], cap),
        )
        cleanup.append(
            (
                "NodeUnpublishVolume restored",
                lambda: client.unpublish(restored.volume_id, paths["pub-b"]),
            )
        )
        got = step("read back + sha256", lambda: _sha256(os.path.join(paths["pub-b"], "data.bin")))
        if got != digest:
            raise RuntimeError(f"restored data differs: {got} != {digest}")
        echo("    restored bytes match")
    finally:
        for label, undo in reversed(cleanup):
            step(label, undo)
        for p in (paths["stage-a"], paths["stage-b"]):
            if os.path.isdir(p):
                os.rmdir(p)
    total = sum(timings.values())
    echo(f"  {'total':<38} {total * 1000:8.1f} ms")
    return timings
