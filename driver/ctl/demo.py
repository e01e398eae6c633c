"""`stowagectl demo`: one volume's life, end to end, each step timed; with `--backup-target`
and `--second-endpoint`, then an off-node backup restored on another node (`run_backup`)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from csi_proto import csi_pb2
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

        digest = step(f"write {data_mib} MiB + fsync", lambda: _write(data, data_mib))
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


class _Steps:
    """Timed steps and the undo list that runs, newest first, whatever happened."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.timings: dict[str, float] = {}
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def step(self, label: str, fn: Callable[[], T]) -> T:
        started = time.monotonic()
        result = fn()
        took = time.monotonic() - started
        self.timings[label] = took
        self.echo(f"  {label:<38} {took * 1000:8.1f} ms")
        return result

    def unwind(self, down_to: int = 0) -> None:
        while len(self.undo) > down_to:
            label, fn = self.undo.pop()
            self.step(label, fn)

    def mount(
        self, client: Client, vol: str, cap: csi_pb2.VolumeCapability, base: str, who: str
    ) -> str:
        """Stage and publish `vol` under `base`; the undo list unpublishes and unstages."""
        staging, target = f"{base}-stage", f"{base}-pub"
        os.makedirs(staging, exist_ok=True)
        self.undo.append((f"remove {who} staging dir", lambda: os.rmdir(staging)))
        self.step(f"NodeStageVolume {who}", lambda: client.stage(vol, staging, cap))
        self.undo.append((f"NodeUnstageVolume {who}", lambda: client.unstage(vol, staging)))
        self.step(f"NodePublishVolume {who}", lambda: client.publish(vol, staging, target, cap))
        self.undo.append((f"NodeUnpublishVolume {who}", lambda: client.unpublish(vol, target)))
        return target


def _until(what: str, fn: Callable[[], T | None], timeout: float) -> T:
    """Call `fn` until it returns something; ABORTED ("in progress, retry") counts as not yet,
    as the CSI sidecars treat it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            got = None
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish within {timeout:.0f}s")
        time.sleep(0.2)


def run_backup(
    node_a: Client,
    node_b: Client,
    workdir: str,
    target: str,
    *,
    fs_type: str = "ext4",
    data_mib: int = 64,
    timeout: float = 300.0,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Write a volume on node A, back it up to `target` (a snapshot of a class with
    stowage.csi.io/backup-target, keep-local false), delete the volume, restore the backup on
    node B (another pool, which never held it) and compare the sha256."""
    steps = _Steps(echo)
    suffix = os.urandom(4).hex()
    cap = capability(False, fs_type)
    os.makedirs(workdir, exist_ok=True)
    a_name, b_name = node_a.node_id(), node_b.node_id()
    echo(f"stowage backup demo: node {a_name} -> target {target!r} -> node {b_name}")
    params = {"stowage.csi.io/backup-target": target, "stowage.csi.io/backup-keep-local": "false"}
    snapshot_id = ""
    try:
        vol = steps.step(
            f"CreateVolume 1 GiB on {a_name}",
            lambda: node_a.create_volume(f"demo-bk-{suffix}", 1024 * MiB, cap),
        )
        steps.undo.append((f"DeleteVolume source on {a_name}",
                           lambda: node_a.delete_volume(vol.volume_id)))
        mounted = steps.mount(node_a, vol.volume_id, cap, os.path.join(workdir, f"a-{suffix}"),
                              "source")
        digest = steps.step(f"write {data_mib} MiB + fsync",
                            lambda: _write(os.path.join(mounted, "data.bin"), data_mib))
        echo(f"    sha256 {digest}")
        snap = steps.step(
            f"backup to {target} (CreateSnapshot until ready)",
            lambda: _until(
                "the upload",
                lambda: (
                    s if (s := node_a.create_snapshot(f"demo-bk-snap-{suffix}", vol.volume_id,
                                                      params)).ready_to_use else None
                ),
                timeout,
            ),
        )
        snapshot_id = snap.snapshot_id
        echo(f"    {snapshot_id}, the node's copy dropped (backup-keep-local: false)")
        steps.unwind()  # the source volume is gone from node A: only the backup is left
        restored = steps.step(
            f"restore on {b_name} (download + verify)",
            lambda: _until(
                "the restore",
                lambda: node_b.create_volume(f"demo-bk-restored-{suffix}", 1024 * MiB, cap,
                                             snapshot=snapshot_id),
                timeout,
            ),
        )
        steps.undo.append(("DeleteVolume restored",
                           lambda: node_b.delete_volume(restored.volume_id)))
        target_b = steps.mount(node_b, restored.volume_id, cap,
                               os.path.join(workdir, f"b-{suffix}"), "restored")
        got = steps.step("read back + sha256", lambda: _sha256(os.path.join(target_b, "data.bin")))
        if got != digest:
            raise RuntimeError(f"restored data differs: {got} != {digest}")
        echo(f"    restored on {b_name}: bytes match")
    finally:
        steps.unwind()
        if snapshot_id:  # any node with the target deletes its manifest
            steps.step("DeleteSnapshot (the backup)", lambda: node_b.delete_snapshot(snapshot_id))
    total = sum(steps.timings.values())
    echo(f"  {'total':<38} {total * 1000:8.1f} ms")
    return steps.timings


def _write(path: str, mib: int) -> str:
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MiB))
        fh.flush()
        os.fsync(fh.fileno())
    return _sha256(path)
