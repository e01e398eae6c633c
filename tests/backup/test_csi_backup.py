"""Backup snapshots through the CSI surface: real driver processes (mode all) on real XFS pools,
real SeaweedFS and rclone S3 servers on loopback (tests/backup/conftest.py). Two pools with two
drivers stand for two nodes: a snapshot taken on node A is restored on node B, which never held
its local copy."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from csi_proto import csi_pb2
from driver.ctl import main as ctl
from driver.ctl.backup import upload_status
from driver.ctl.client import Client, block_cap, mount_cap
from harness import DriverProcess, Pool
from tests.backup.conftest import KINDS, SECRET_KEY, S3Server, free_port, start_server
from tests.integration.helpers import MiB, Mounted, sha256, write_random

pytestmark = pytest.mark.root

TARGET = "main"
PARAMS = {"stowage.csi.io/backup-target": TARGET}
KEY_A = "00" * 32
KEY_B = "11" * 32
CLUSTER = "test-cluster"


@pytest.fixture(scope="module", params=KINDS)
def store(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """Each test runs against SeaweedFS and against `rclone serve s3`: no dialect assumption
    hides behind one server's leniency."""
    server, teardown = start_server(request.param)
    try:
        yield server
    finally:
        teardown()


def node(
    pool: Pool, started: list[DriverProcess], spec: str, *extra: str, key: str = KEY_A,
    node_id: str = "node-a",
) -> DriverProcess:
    key_file = os.path.join(pool.base, "backup.key")
    with open(key_file, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
    d = DriverProcess(
        pool, "--backup-target", spec, "--backup-key-file", key_file,
        "--backup-cluster-id", CLUSTER, *extra, node_id=node_id,
    )
    started.append(d)
    return d


def spec_for(server: S3Server, bucket: str, endpoint: str = "") -> str:
    return f"{TARGET}=s3://{bucket}/csi?endpoint={endpoint or server.endpoint}"


def code_of(fn: Callable[[], Any]) -> grpc.StatusCode | None:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return None


def failed_code(client: Client, vol: str) -> grpc.StatusCode | None:
    """The code the CO's (retried) CreateSnapshot reports once the upload has failed."""
    end = time.monotonic() + 60
    code = None
    while code is None and time.monotonic() < end:
        code = code_of(lambda: client.create_snapshot("snap", vol, PARAMS))
        time.sleep(0.3)
    return code


def until_ready(client: Client, name: str, vol: str, timeout: float = 120.0,
                params: dict[str, str] = PARAMS) -> csi_pb2.Snapshot:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snap = client.create_snapshot(name, vol, params)
        if snap.ready_to_use:
            return snap
        time.sleep(0.3)
    raise AssertionError(f"snapshot {name} never became ready")


def restore(client: Client, name: str, snapshot_id: str, size: int,
            cap: csi_pb2.VolumeCapability, timeout: float = 120.0) -> csi_pb2.Volume:
    """CreateVolume from a backup as the external-provisioner does it: retried while ABORTED."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return client.create_volume(name, size, cap, snapshot=snapshot_id)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.ABORTED:
                raise
            time.sleep(0.3)
    raise AssertionError(f"restore {name} never finished")


def manifests(server: S3Server, bucket: str) -> list[str]:
    resp = server.client().list_objects_v2(Bucket=bucket, Prefix="csi/manifests/")  # type: ignore[attr-defined]
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in resp.get("Contents", []))


def volume_rows(pool: Pool) -> list[str]:
    con = sqlite3.connect(f"file:{os.path.join(pool.mount, 'meta.db')}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT id FROM volumes")]
    finally:
        con.close()


def make_data_volume(client: Client, pool: Pool, name: str, mib: int) -> tuple[str, str]:
    vol = client.create_volume(name, 128 * MiB, mount_cap("ext4")).volume_id
    with Mounted(client, pool.base, vol, fs_type="ext4") as m:
        digest = write_random(os.path.join(m.target, "data"), mib)
    return vol, digest


def backed_up(server: S3Server, pools: Callable[[], Pool], drivers: list[DriverProcess],
              mib: int) -> tuple[str, str, Pool, str, str]:
    """A volume with `mib` MiB of data on node A, backed up and ready: (bucket, spec, node A's
    pool, snapshot ID, sha256 of the data file). Node A's driver is left running."""
    bucket = server.make_bucket()
    spec = spec_for(server, bucket)
    pool_a = pools()
    a = node(pool_a, drivers, spec).start()
    vol, digest = make_data_volume(a, pool_a, "src", mib)
    sid = until_ready(a, "snap", vol).snapshot_id
    a.close()
    return bucket, spec, pool_a, sid, digest


def test_backup_then_restore_on_another_node(store, pools, drivers):
    bucket = store.make_bucket()
    spec = spec_for(store, bucket)
    pool_a, pool_b = pools(), pools()
    a = node(pool_a, drivers, spec).start()
    vol, digest = make_data_volume(a, pool_a, "src", 8)

    first = a.create_snapshot("snap-1", vol, PARAMS)
    assert first.snapshot_id.startswith(f"b-{TARGET}-") and not first.ready_to_use
    snap = until_ready(a, "snap-1", vol)
    assert snap.snapshot_id == first.snapshot_id  # idempotent: the same snapshot
    assert manifests(store, bucket) == [snap.snapshot_id]
    listed = {e.snapshot.snapshot_id: e.snapshot.ready_to_use for e in a.list_snapshots()}
    assert listed == {snap.snapshot_id: True}
    # Another class parameter for the same name is refused; unknown targets name the known.
    assert code_of(lambda: a.create_snapshot("snap-1", vol)) is grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:
        a.create_snapshot("snap-x", vol, {"stowage.csi.io/backup-target": "nope"})
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "configured: main" in (info.value.details() or "")

    # Disaster recovery without a driver: stowagectl reads the target and writes the image.
    key_file = os.path.join(pool_a.base, "backup.key")
    creds = ["--backup-target", spec, "--backup-key-file", key_file]
    assert ctl.main(["backup", "list", *creds]) == 0
    assert ctl.main(["backup", "verify", *creds]) == 0
    image = os.path.join(pool_a.base, "dr.img")
    assert ctl.main(["backup", "restore", snap.snapshot_id, "--to", image, *creds]) == 0
    local_copy = os.path.join(pool_a.mount, "snapshots", snap.snapshot_id + ".img")
    assert sha256(image) == sha256(local_copy)
    os.unlink(image)

    # Same node: restored from the local copy.
    local = a.create_volume("same-node", 128 * MiB, mount_cap("ext4"), snapshot=snap.snapshot_id)
    with Mounted(a, pool_a.base, local.volume_id, fs_type="ext4") as m:
        assert sha256(os.path.join(m.target, "data")) == digest

    # An incremental backup after 1 MiB more: the engine compares extent maps.
    with Mounted(a, pool_a.base, vol, fs_type="ext4", tag="again") as m:
        write_random(os.path.join(m.target, "more"), 1)
    snap2 = until_ready(a, "snap-2", vol)

    # A class that drops the local copy once the backup is durable: node A then downloads too.
    drop = {**PARAMS, "stowage.csi.io/backup-keep-local": "false"}
    snap3 = until_ready(a, "snap-3", vol, params=drop)
    copy3 = os.path.join(pool_a.mount, "snapshots", snap3.snapshot_id + ".img")
    end = time.monotonic() + 30
    while os.path.exists(copy3) and time.monotonic() < end:
        time.sleep(0.1)
    assert not os.path.exists(copy3)
    assert snap3.snapshot_id in {e.snapshot.snapshot_id for e in a.list_snapshots()}
    back = restore(a, "from-dropped", snap3.snapshot_id, 128 * MiB, mount_cap("ext4"))
    with Mounted(a, pool_a.base, back.volume_id, fs_type="ext4") as m:
        assert sha256(os.path.join(m.target, "data")) == digest
    a.delete_volume(back.volume_id)
    a.delete_snapshot(snap3.snapshot_id)
    assert code_of(
        lambda: a.create_snapshot("bad", vol, {"stowage.csi.io/backup-keep-local": "false"})
    ) is grpc.StatusCode.INVALID_ARGUMENT

    # Node B never held a local copy: it downloads, into a larger claim.
    b = node(pool_b, drivers, spec, node_id="node-b").start()
    got = b.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert got.snapshot.ready_to_use and got.snapshot.size_bytes == 128 * MiB
    assert code_of(
        lambda: b.create_volume("wrong-kind", 128 * MiB, block_cap(), snapshot=snap.snapshot_id)
    ) is grpc.StatusCode.INVALID_ARGUMENT
    restored = restore(b, "restored", snap.snapshot_id, 320 * MiB, mount_cap("ext4"))
    assert restored.capacity_bytes == 320 * MiB
    again = restore(b, "restored", snap.snapshot_id, 320 * MiB, mount_cap("ext4"))
    assert again.volume_id == restored.volume_id
    with Mounted(b, pool_b.base, restored.volume_id, fs_type="ext4") as m:
        assert sha256(os.path.join(m.target, "data")) == digest
        assert os.statvfs(m.target).f_blocks * os.statvfs(m.target).f_frsize > 250 * MiB
    assert not os.listdir(os.path.join(pool_b.mount, "restoring"))

    # DeleteSnapshot on node B (not the node that took it) removes the manifest; on node A
    # the local copy too. Deleting twice is fine.
    b.delete_snapshot(snap.snapshot_id)
    assert manifests(store, bucket) == [snap2.snapshot_id]
    a.delete_snapshot(snap.snapshot_id)
    a.delete_snapshot(snap.snapshot_id)
    assert not os.path.exists(os.path.join(pool_a.mount, "snapshots", snap.snapshot_id + ".img"))
    assert code_of(
        lambda: b.create_volume("gone", 128 * MiB, mount_cap("ext4"), snapshot=snap.snapshot_id)
    ) is grpc.StatusCode.NOT_FOUND
    # The second backup read only what the extent maps name as changed.
    assert f"backup {snap2.snapshot_id} (extents)" in drivers[0].log()
    for c in (a, b):
        c.close()


def test_unreachable_store_is_reported_then_resumed_after_restart(store, pools, drivers):
    bucket = store.make_bucket()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    pool_a = pools()
    d = node(pool_a, drivers, spec_for(store, bucket, dead))
    a = d.start()
    vol, _ = make_data_volume(a, pool_a, "src", 4)
    assert failed_code(a, vol) is grpc.StatusCode.UNAVAILABLE  # reported, never swallowed
    a.close()
    d.stop()
    # The same target reachable again: the failed upload restarts on the next call.
    d.extra[1] = spec_for(store, bucket)
    a = d.start()
    snap = until_ready(a, "snap", vol)
    assert manifests(store, bucket) == [snap.snapshot_id]
    a.close()


def test_kill_mid_upload_resumes_at_start(store, pools, drivers):
    bucket = store.make_bucket()
    pool_a = pools()
    spec = spec_for(store, bucket)
    d = node(pool_a, drivers, spec, "--backup-rate-limit", "1Mi", "--backup-workers", "1")
    a = d.start()
    vol, _ = make_data_volume(a, pool_a, "src", 12)
    sid = a.create_snapshot("snap", vol, PARAMS).snapshot_id
    time.sleep(3)  # some chunks are up, most are not
    assert manifests(store, bucket) == []
    # The operator sees the upload's progress from the node's records, the driver running.
    end = time.monotonic() + 30
    while (row := upload_status(pool_a.mount)[0])["done"] == 0 and time.monotonic() < end:
        time.sleep(0.3)  # the driver writes the progress every few seconds
    assert row["snapshot"] == sid and row["phase"] == "uploading"
    assert 0 < row["done"] < row["total"] == 128 * MiB and 0 < row["percent"] < 100
    assert ctl.main(["backup", "status", "--pool-dir", pool_a.mount]) == 0
    a.close()
    d.stop(signal.SIGKILL)
    d.extra = d.extra[:6]  # no rate limit now
    a = d.start()
    # Nobody calls CreateSnapshot: the start-up reconcile resumes the upload by itself.
    end = time.monotonic() + 90
    while manifests(store, bucket) != [sid] and time.monotonic() < end:
        time.sleep(0.3)
    assert manifests(store, bucket) == [sid]
    assert until_ready(a, "snap", vol).snapshot_id == sid
    a.close()


def test_restore_errors_wrong_key_and_damaged_chunk(store, pools, drivers):
    bucket, spec, pool_a, sid, _ = backed_up(store, pools, drivers, 4)
    pool_b = pools()

    wrong = node(pool_b, drivers, spec, key=KEY_B, node_id="node-b")
    b = wrong.start()
    with pytest.raises(grpc.RpcError) as info:
        b.create_volume("r", 128 * MiB, mount_cap("ext4"), snapshot=sid)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "key" in (info.value.details() or "")
    assert volume_rows(pool_b) == []
    b.close()
    wrong.stop()

    # Damage one data chunk in the store: the restore answers DATA_LOSS naming it.
    s3 = store.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="csi/chunks/")["Contents"]]  # type: ignore[attr-defined]
    victim = max(keys, key=lambda k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"])  # type: ignore[attr-defined]
    s3.put_object(Bucket=bucket, Key=victim, Body=b"STC1" + bytes(64))  # type: ignore[attr-defined]
    key_file = os.path.join(pool_a.base, "backup.key")
    assert ctl.main(["backup", "verify", "--backup-target", spec, "--backup-key-file",
                     key_file]) == 1  # the damaged snapshot is reported
    right = node(pool_b, drivers, spec, node_id="node-b")
    b = right.start()
    with pytest.raises(grpc.RpcError) as info:
        restore(b, "r", sid, 128 * MiB, mount_cap("ext4"))
    assert info.value.code() is grpc.StatusCode.DATA_LOSS
    assert victim.rsplit("/", 1)[-1] in (info.value.details() or "")
    assert volume_rows(pool_b) == []
    b.close()


def test_slow_restore_answers_in_progress_and_survives_a_restart(store, pools, drivers):
    bucket, spec, _, sid, digest = backed_up(store, pools, drivers, 12)
    pool_b = pools()

    # Node B restores at 1 MiB/s: longer than the call waits, so the CO is told "in progress".
    slow = node(pool_b, drivers, spec, "--backup-rate-limit", "1Mi", "--backup-workers", "1",
                node_id="node-b")
    b = slow.start()
    with pytest.raises(grpc.RpcError) as info:
        b.create_volume("r", 128 * MiB, mount_cap("ext4"), snapshot=sid)
    assert info.value.code() is grpc.StatusCode.ABORTED
    assert "the restore continues" in (info.value.details() or "")
    assert volume_rows(pool_b) == []
    b.close()
    slow.stop(signal.SIGKILL)  # mid-restore

    fast = node(pool_b, drivers, spec, node_id="node-b")
    b = fast.start()
    restored = restore(b, "r", sid, 128 * MiB, mount_cap("ext4"))
    assert "resuming restore of " + sid in fast.log()  # continued, not started over
    with Mounted(b, pool_b.base, restored.volume_id, fs_type="ext4") as m:
        assert sha256(os.path.join(m.target, "data")) == digest
    assert volume_rows(pool_b) == [restored.volume_id]
    b.close()

    # The store unreachable from a node: UNAVAILABLE, retryable.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    fast.stop()
    cut_off = node(pool_b, drivers, spec_for(store, bucket, dead), node_id="node-b")
    b = cut_off.start()
    assert code_of(
        lambda: b.create_volume("r2", 128 * MiB, mount_cap("ext4"), snapshot=sid)
    ) is grpc.StatusCode.UNAVAILABLE
    b.close()


def test_access_denied_is_reported_with_its_code(store, pools, drivers):
    bucket = store.make_bucket()
    pool_a = pools()
    d = node(pool_a, drivers, spec_for(store, bucket))
    d.env = {"AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    a = d.start()
    vol, _ = make_data_volume(a, pool_a, "src", 1)
    assert failed_code(a, vol) is grpc.StatusCode.PERMISSION_DENIED
    assert "not-the-secret" not in d.log()
    a.close()


def scrape(port: int) -> dict[str, float]:
    """The driver's /metrics as {'name{labels}': value} (comment lines dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def until_metric(port: int, name: str, want: Callable[[float], bool],
                 timeout: float = 60.0) -> dict[str, float]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = scrape(port)
        if name in got and want(got[name]):
            return got
        time.sleep(0.3)
    raise AssertionError(f"{name} never satisfied the condition: {scrape(port).get(name)}")


def test_metrics_and_periodic_verify_find_damage(store, pools, drivers):
    bucket = store.make_bucket()
    pool_a = pools()
    port = free_port()
    d = node(pool_a, drivers, spec_for(store, bucket), "--backup-verify-interval", "1s",
             "--metrics-address", f"127.0.0.1:{port}")
    a = d.start()
    vol, _ = make_data_volume(a, pool_a, "src", 4)
    before = time.time()
    sid = until_ready(a, "snap", vol).snapshot_id
    got = scrape(port)
    assert got[f'stowage_backup_last_success_timestamp_seconds{{volume="{vol}"}}'] >= before - 1
    assert got[f'stowage_backup_read_bytes_total{{target="{TARGET}"}}'] >= 4 * MiB
    assert got[f'stowage_backup_uploaded_bytes_total{{target="{TARGET}"}}'] >= MiB
    assert got['stowage_backup_job_duration_seconds_count{kind="upload"}'] == 1
    # The pool metrics count the local copy kept after the upload (the next backup's base).
    local = os.stat(os.path.join(pool_a.mount, "snapshots", sid + ".img")).st_blocks * 512
    assert local >= 4 * MiB and got["stowage_pool_allocated_bytes"] >= local + 4 * MiB

    # The scrub verifies the newest backup of the volume, then finds a damaged chunk.
    ok = f'stowage_backup_last_verify_ok{{volume="{vol}"}}'
    until_metric(port, ok, lambda v: v == 1)
    s3 = store.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="csi/chunks/")["Contents"]]  # type: ignore[attr-defined]
    s3.put_object(Bucket=bucket, Key=keys[0], Body=b"STC1" + bytes(64))  # type: ignore[attr-defined]
    got = until_metric(port, ok, lambda v: v == 0)
    assert got[f'stowage_backup_verify_damaged_chunks_total{{target="{TARGET}"}}'] >= 1
    assert got[f'stowage_backup_last_verify_timestamp_seconds{{volume="{vol}"}}'] >= before
    assert "is DAMAGED" in d.log() and keys[0].rsplit("/", 1)[-1] in d.log()
    assert "MiB/s" in d.log()  # the upload's rate is logged
    a.close()
    # The freshness of the last backup survives a restart.
    d.stop()
    d.extra = [x for x in d.extra if x not in ("--backup-verify-interval", "1s")]
    a = d.start()
    got = scrape(port)
    assert got[f'stowage_backup_last_success_timestamp_seconds{{volume="{vol}"}}'] >= before - 1
    a.close()


@pytest.mark.parametrize("store", ["seaweedfs"], indirect=True)
def test_deleted_files_are_not_carried_into_a_backup(store, pools, drivers):
    """CreateSnapshot of a backup class trims the mounted filesystem before freezing it: the
    loop device punches holes in the image where a deleted file was, so it is neither read nor
    uploaded (a node-side behaviour: one server kind is enough)."""
    bucket = store.make_bucket()
    pool_a = pools()
    port = free_port()
    d = node(pool_a, drivers, spec_for(store, bucket), "--metrics-address", f"127.0.0.1:{port}")
    a = d.start()
    vol = a.create_volume("src", 128 * MiB, mount_cap("ext4")).volume_id
    with Mounted(a, pool_a.base, vol, fs_type="ext4") as m:
        write_random(os.path.join(m.target, "big"), 40)
        os.sync()
        os.unlink(os.path.join(m.target, "big"))
        write_random(os.path.join(m.target, "small"), 1)
        sid = until_ready(a, "snap", vol).snapshot_id  # while mounted: trimmed, then frozen
    got = scrape(port)
    assert got[f'stowage_backup_read_bytes_total{{target="{TARGET}"}}'] < 16 * MiB
    assert got[f'stowage_backup_uploaded_bytes_total{{target="{TARGET}"}}'] < 16 * MiB
    assert f"trimmed {vol} before its snapshot" in d.log()
    local = os.path.join(pool_a.mount, "snapshots", sid + ".img")
    assert os.stat(local).st_blocks * 512 < 16 * MiB  # the pool does not hold it either
    a.close()


class _FullStore(BaseHTTPRequestHandler):
    """An S3 endpoint whose disk is full: reads find nothing, every write is refused (507)."""

    def _answer(self, status: int, code: str) -> None:
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>m</Message></Error>"
        data = b"" if self.command == "HEAD" else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(404, "NoSuchKey")

    def do_HEAD(self) -> None:
        self._answer(404, "NoSuchKey")

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(507, "InsufficientStorage")

    def log_message(self, *args: object) -> None:
        pass


def test_missing_bucket_and_full_store_answer_their_codes(store, pools, drivers):
    pool_a = pools()
    d = node(pool_a, drivers, f"{TARGET}=s3://no-such-bucket-{os.getpid()}/csi"
             f"?endpoint={store.endpoint}")
    a = d.start()
    vol, _ = make_data_volume(a, pool_a, "src", 1)
    assert failed_code(a, vol) is grpc.StatusCode.FAILED_PRECONDITION
    a.close()
    d.stop()

    full = ThreadingHTTPServer(("127.0.0.1", 0), _FullStore)
    t = threading.Thread(target=full.serve_forever, daemon=True)
    t.start()
    try:
        d.extra[1] = f"{TARGET}=s3://bucket/csi?endpoint=http://127.0.0.1:{full.server_address[1]}"
        a = d.start()
        assert failed_code(a, vol) is grpc.StatusCode.RESOURCE_EXHAUSTED
        a.close()
    finally:
        full.shutdown()
        full.server_close()
        t.join()
    assert SECRET_KEY not in d.log() and KEY_A not in d.log()
