"""kill -9 of the process doing a backup or a restore: the next run (a new process) continues
instead of starting over, and no manifest ever names a missing chunk."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

from driver.backup import SnapshotRecord
from tests.backup.conftest import REPO_ROOT, S3Server, make_repo
from tests.backup.images import rand_chunks, sha256, write_image

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
