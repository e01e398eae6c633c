"""The SnapshotMetadata service (changed-block tracking) on real XFS and btrfs pools, driven over
the driver's socket by a streaming client that does what a backup tool behind the
external-snapshot-metadata sidecar does: copy the allocated ranges of a first snapshot, then
apply the delta ranges of the next one onto that copy. The copy must equal the target
snapshot's bytes exactly, and the delta must name only about what was written."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator

import pytest

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.ctl.client import Client, block_cap
from tests.conftest import DriverProcess, Pool, make_pool
from tests.integration.helpers import MiB, Mounted, sha256, status_code

SIZE = 64 * MiB


@pytest.fixture(params=["xfs", "btrfs"])
def fs_pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    made, teardown = make_pool(request.param, size=4 << 30)
    try:
        yield made
    finally:
        teardown()



def _ranges(stream: Iterable[object], capacity: int) -> list[tuple[int, int]]:
    out = []
    for msg in stream:
        assert msg.block_metadata_type == csi_pb2.BlockMetadataType.VARIABLE_LENGTH  # type: ignore[attr-defined]
        assert msg.volume_capacity_bytes == capacity  # type: ignore[attr-defined]
        out += [(b.byte_offset, b.size_bytes) for b in msg.block_metadata]  # type: ignore[attr-defined]
    offsets = [o for o, _ in out]
    assert offsets == sorted(offsets)
    assert all(o + n <= capacity for o, n in out)
    return out


def _apply(ranges: list[tuple[int, int]], source: str, dest: str) -> None:
    with open(source, "rb") as src, open(dest, "r+b") as dst:
        for offset, length in ranges:
            src.seek(offset)
            dst.seek(offset)
            dst.write(src.read(length))


def _write(device: str, chunks: list[tuple[int, bytes]]) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset, data in chunks:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_allocated_then_delta_rebuild_the_target_exactly(fs_pool: Pool) -> None:
    drv = DriverProcess(fs_pool)
    client = drv.start()
    try:
        _run(fs_pool, client)
    finally:
        client.close()
        drv.stop()


def _run(pool: Pool, client: Client) -> None:
    meta = csi_pb2_grpc.SnapshotMetadataStub(client.channel)
    caps = client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in services
    rng = random.Random(18)
    vid = client.create_volume("cbt", SIZE, block_cap()).volume_id
    other = client.create_volume("other", SIZE, block_cap()).volume_id
    snap_dir = os.path.join(pool.mount, "snapshots")
    with Mounted(client, pool.base, vid, block=True) as m:
        _write(m.target, [(i * 4 * MiB, rng.randbytes(MiB)) for i in range(0, 16, 3)])
        base = client.create_snapshot("base", vid).snapshot_id
        changed = [(5 * MiB + 4096, rng.randbytes(8192)), (40 * MiB, rng.randbytes(MiB)),
                   (SIZE - 4096, rng.randbytes(4096))]
        _write(m.target, changed)
        target = client.create_snapshot("target", vid).snapshot_id
    other_snap = client.create_snapshot("other", other).snapshot_id
    base_img = os.path.join(snap_dir, base + ".img")
    target_img = os.path.join(snap_dir, target + ".img")

    # Full backup of the base: only the allocated ranges, paged 2 per message.
    allocated = _ranges(
        meta.GetMetadataAllocated(
            csi_pb2.GetMetadataAllocatedRequest(snapshot_id=base, max_results=2)
        ),
        SIZE,
    )
    assert 0 < sum(n for _, n in allocated) < SIZE
    copy = os.path.join(pool.base, "backup.img")
    with open(copy, "wb") as fh:
        fh.truncate(SIZE)
    _apply(allocated, base_img, copy)
    assert sha256(copy) == sha256(base_img)

    # Incremental: the delta, resumed after an interrupted first message.
    first = next(
        iter(
            meta.GetMetadataDelta(
                csi_pb2.GetMetadataDeltaRequest(
                    base_snapshot_id=base, target_snapshot_id=target, max_results=1
                )
            )
        )
    )
    (done,) = first.block_metadata
    rest = _ranges(
        meta.GetMetadataDelta(
            csi_pb2.GetMetadataDeltaRequest(
                base_snapshot_id=base,
                target_snapshot_id=target,
                starting_offset=done.byte_offset + done.size_bytes,
            )
        ),
        SIZE,
    )
    delta = [(done.byte_offset, done.size_bytes), *rest]
    written = sum(len(d) for _, d in changed)
    assert written <= sum(n for _, n in delta) <= written + 8 * MiB  # not the whole volume
    _apply(delta, target_img, copy)
    assert sha256(copy) == sha256(target_img)
    os.unlink(copy)

    def delta_req(**kw: object) -> Callable[[], object]:
        args = {"base_snapshot_id": base, "target_snapshot_id": target, **kw}
        return lambda: list(meta.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(**args)))

    refused = {
        "snapshots of two volumes": (delta_req(base_snapshot_id=other_snap), "INVALID_ARGUMENT"),
        "missing base": (delta_req(base_snapshot_id="s-" + "0" * 32), "NOT_FOUND"),
        "no base": (delta_req(base_snapshot_id=""), "INVALID_ARGUMENT"),
        "offset at the end": (delta_req(starting_offset=SIZE), "OUT_OF_RANGE"),
        "negative offset": (delta_req(starting_offset=-1), "INVALID_ARGUMENT"),
        "negative max_results": (delta_req(max_results=-1), "INVALID_ARGUMENT"),
        "allocated past the end": (
            lambda: list(
                meta.GetMetadataAllocated(
                    csi_pb2.GetMetadataAllocatedRequest(snapshot_id=base, starting_offset=SIZE)
                )
            ),
            "OUT_OF_RANGE",
        ),
        "allocated of a missing snapshot": (
            lambda: list(
                meta.GetMetadataAllocated(
                    csi_pb2.GetMetadataAllocatedRequest(snapshot_id="s-" + "1" * 32)
                )
            ),
            "NOT_FOUND",
        ),
    }
    before = sorted(os.listdir(snap_dir))
    for what, (call, want) in refused.items():
        assert status_code(call).name == want, what
    assert sorted(os.listdir(snap_dir)) == before
