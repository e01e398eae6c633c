"""kill -9 of the process doing a backup, a restore or a garbage collection: the next run (a new
process) continues instead of starting over, no manifest ever names a missing chunk, and after
the CO's retries everything it was told exists exists and verifies, with no orphan volume."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from driver import faults
from driver.backup import SnapshotRecord
from driver.ctl import local
from driver.ctl import main as ctl
from driver.ctl.client import Client, mount_cap
from tests.backup.conftest import REPO_ROOT, S3Server, make_repo, start_server
from tests.backup.images import rand_chunks, sha256, write_image
from tests.backup.test_csi_backup import (
    PARAMS,
    backed_up,
    make_data_volume,
    manifests,
    node,
    restore,
    spec_for,
    until_ready,
    volume_rows,
)
from tests.conftest import DriverProcess, Pool
from tests.integration.helpers import MiB, Mounted

CHUNK = 64 << 10
N = 120

CHILD = r"""
import json, sys, time
from tests.backup.conftest import S3Server, make_repo
from driver.backup import SnapshotRecord
verb, endpoint_port, bucket, path = sys.argv[1:5]
srv = S3Server("any", "/nonexistent", port=int(endpoint_port))
repo = make_repo(srv, bucket, workers=2)
repo.checkpoint_interval = 0.1
def progress(p):
    print(json.dumps([p.done_bytes, p.total_bytes]), flush=True)
    time.sleep(0.02)  # slow enough to be killed midway
if verb == "backup":
    repo.backup(path, SnapshotRecord("s-1", "v-1"), progress=progress)
else:
    repo.restore("s-1", path, progress=progress)
print("finished", flush=True)
"""


def run_and_kill(s3: S3Server, bucket: str, verb: str, path: str) -> None:
    """Run `verb` in a child process and SIGKILL it once a third of the bytes are done."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, verb, str(s3.port), bucket, path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("finished"):
                raise AssertionError("the child finished before it could be killed")
            done, total = json.loads(line)
            if done > total // 3:
                proc.send_signal(signal.SIGKILL)
                break
        assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_during_backup_and_restore(s3: S3Server, tmp_path: object) -> None:
    bucket = s3.make_bucket()
    img = os.path.join(str(tmp_path), "a.img")
    write_image(img, N * CHUNK, CHUNK, rand_chunks(random.Random(9), list(range(N)), CHUNK))

    run_and_kill(s3, bucket, "backup", img)
    repo = make_repo(s3, bucket, workers=2)
    assert repo.list() == []  # killed before its manifest: nothing half-visible
    stored = len(list(repo.store.list("chunks/")))
    assert 0 < stored < N
    r = repo.backup(img, SnapshotRecord("s-1", "v-1"))
    assert r.uploaded_chunks == N - stored  # continued, did not start over
    assert repo.verify("s-1").ok

    out = os.path.join(str(tmp_path), "out.img")
    run_and_kill(s3, bucket, "restore", out)
    assert not os.path.exists(out)
    with open(out + ".stowage-restore", encoding="utf-8") as fh:
        durable = len(json.load(fh)["done"])
    fetched: list[str] = []
    fresh = make_repo(s3, bucket, workers=2)
    real_get = fresh.store.get

    def counting_get(key: str) -> bytes:
        fetched.append(key)
        return real_get(key)

    fresh.store.get = counting_get  # type: ignore[method-assign]
    fresh.restore("s-1", out)
    assert len([k for k in fetched if k.startswith("chunks/")]) == N - durable
    assert sha256(out) == sha256(img)


# --- fault points (driver/faults.py BACKUP_OPERATIONS): kill -9 where the table says -------------
UPLOAD_POINTS = ["backup-upload:chunk-stored@2", "backup-upload:manifest-written"]
RESTORE_POINTS = ["backup-restore:chunk-written@2", "backup-restore:image-ready"]
GC_POINTS = ["backup-gc:marked", "backup-gc:chunk-deleted@2"]


def test_every_backup_fault_point_has_a_case() -> None:
    covered = {p.split("@")[0] for p in UPLOAD_POINTS + RESTORE_POINTS + GC_POINTS}
    assert covered == {p for pts in faults.BACKUP_OPERATIONS.values() for p in pts}


@pytest.fixture(scope="module")
def seaweed() -> Iterator[S3Server]:
    """The driver-level crash cases run on one server kind (the dialects are covered by
    test_csi_backup.py); the gc cases run on both."""
    server, teardown = start_server("seaweedfs")
    try:
        yield server
    finally:
        teardown()


def killed_at(d: DriverProcess, point: str) -> None:
    """The driver ended by SIGKILL at `point` (its own log line says so)."""
    assert d.proc is not None
    assert d.proc.wait(timeout=120) == -signal.SIGKILL, d.log()
    d.proc = None
    assert f"fault point {point.split('@', maxsplit=1)[0]} reached" in d.log()


def assert_pool_consistent(pool: Pool) -> None:
    """`stowagectl check`: records, images, loops and mounts agree (no orphan image)."""
    found = local.check(pool.mount)
    assert found.ok, "stowagectl check found problems:\n" + "\n".join(found.problems)


def start_crashing(d: DriverProcess, point: str) -> Client:
    d.env = {"STOWAGE_FAULTS": point}
    try:
        return d.start()
    finally:
        d.env = {}


@pytest.mark.root
@pytest.mark.parametrize("point", UPLOAD_POINTS)
def test_kill_9_in_upload_then_co_retries(seaweed: S3Server, pools: Callable[[], Pool],
                                          drivers: list[DriverProcess], point: str) -> None:
    bucket = seaweed.make_bucket()
    spec = spec_for(seaweed, bucket)
    pool_a = pools()
    d = node(pool_a, drivers, spec)
    a = start_crashing(d, point)
    vol, _ = make_data_volume(a, pool_a, "src", 4)
    try:
        sid = a.create_snapshot("snap", vol, PARAMS).snapshot_id  # told: it exists, not ready
    except grpc.RpcError:
        raise AssertionError("the upload runs after CreateSnapshot answered") from None
    killed_at(d, point)
    a.close()
    a = d.start()
    snap = until_ready(a, "snap", vol)  # the CO's retries
    assert snap.snapshot_id == sid
    assert manifests(seaweed, bucket) == [sid]  # one manifest, the one the CO knows
    key_file = os.path.join(pool_a.base, "backup.key")
    creds = ["--backup-target", spec, "--backup-key-file", key_file]
    assert ctl.main(["backup", "verify", *creds]) == 0
    image = os.path.join(pool_a.base, "dr.img")
    assert ctl.main(["backup", "restore", sid, "--to", image, *creds]) == 0
    assert sha256(image) == sha256(os.path.join(pool_a.mount, "snapshots", sid + ".img"))
    assert_pool_consistent(pool_a)
    a.close()


@pytest.mark.root
@pytest.mark.parametrize("point", RESTORE_POINTS)
def test_kill_9_in_restore_then_co_retries(seaweed: S3Server, pools: Callable[[], Pool],
                                           drivers: list[DriverProcess], point: str) -> None:
    _, spec, _, sid, digest = backed_up(seaweed, pools, drivers, 6)
    pool_b = pools()

    d = node(pool_b, drivers, spec, node_id="node-b")
    b = start_crashing(d, point)
    with contextlib.suppress(grpc.RpcError):  # ABORTED (in progress), or the connection drops
        b.create_volume("r", 128 * MiB, mount_cap("ext4"), snapshot=sid)
    killed_at(d, point)
    b.close()
    assert volume_rows(pool_b) == []  # nothing half-visible
    b = d.start()
    restored = restore(b, "r", sid, 128 * MiB, mount_cap("ext4"))
    assert volume_rows(pool_b) == [restored.volume_id]  # exactly one volume: no orphan
    assert not os.listdir(os.path.join(pool_b.mount, "restoring"))
    with Mounted(b, pool_b.base, restored.volume_id, fs_type="ext4") as m:
        assert sha256(os.path.join(m.target, "data")) == digest
    assert_pool_consistent(pool_b)
    b.close()


def gc_killed_at(s3: S3Server, bucket: str, key_file: str, point: str) -> None:
    """`stowagectl backup gc --min-age 0` in a child process, killed at `point`."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from driver.ctl.main import main; "
         "sys.exit(main(sys.argv[1:]))", "backup", "gc", "--min-age", "0",
         "--backup-target", f"t1=s3://{bucket}/g?endpoint={s3.endpoint}",
         "--backup-key-file", key_file],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
        env={**os.environ, "STOWAGE_FAULTS": point},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert f"fault point {point.split('@', maxsplit=1)[0]} reached" in proc.stderr


@pytest.mark.parametrize("point", GC_POINTS)
def test_kill_9_in_gc_never_loses_a_live_chunk(s3: S3Server, tmp_path: object,
                                              point: str) -> None:
    bucket = s3.make_bucket()
    rng = random.Random(4)
    shared = rand_chunks(rng, list(range(8)), CHUNK)
    img_a, img_b = (os.path.join(str(tmp_path), n) for n in ("a.img", "b.img"))
    write_image(img_a, 16 * CHUNK, CHUNK, {**shared, **rand_chunks(rng, list(range(8, 16)), CHUNK)})
    write_image(img_b, 16 * CHUNK, CHUNK, {**shared, **rand_chunks(rng, list(range(8, 16)), CHUNK)})
    repo = make_repo(s3, bucket, prefix="g", stale_after=3.0)
    repo.backup(img_a, SnapshotRecord("s-a", "v-1"))
    repo.backup(img_b, SnapshotRecord("s-b", "v-1"))
    repo.delete("s-a")  # its own chunks are garbage, the shared ones are not
    key_file = os.path.join(str(tmp_path), "key")
    with open(key_file, "w", encoding="ascii") as fh:
        fh.write(bytes(range(32)).hex())
    time.sleep(1.1)  # chunks strictly older than the candidate list
    if point.startswith("backup-gc:chunk-deleted"):
        assert repo.gc(min_candidate_age=0).candidates >= 4  # the mark; the sweep is killed
        time.sleep(1.1)
    gc_killed_at(s3, bucket, key_file, point)
    assert repo.verify("s-b").ok  # nothing a live manifest needs was collected

    # A backup after the crash (of the deleted image again: it needs the candidates back),
    # then passes to the end: everything live verifies, the garbage goes.
    time.sleep(1.1)
    repo.backup(img_a, SnapshotRecord("s-c", "v-1"))
    repo.delete("s-b")
    time.sleep(1.1)
    for _ in range(2):  # sweeps what the crashed pass left, marks s-b's; then sweeps those
        repo.gc(min_candidate_age=0)
        time.sleep(1.1)
    assert [s.snapshot_id for s in repo.list()] == ["s-c"]
    assert repo.verify("s-c").ok
    out = os.path.join(str(tmp_path), "out.img")
    repo.restore("s-c", out)
    assert sha256(out) == sha256(img_a)
    live = repo.show("s-c").chunk_ids()
    assert {o.key.rsplit("/", 1)[-1] for o in repo.store.list("chunks/")} == live
