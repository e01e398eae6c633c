"""Retention: `stowagectl backup prune --keep-last N` keeps the newest N backups of each volume
that this cluster owns and deletes the older manifests (gc reclaims their chunks). Against both
S3 servers; the plan itself is also checked without a store."""

from __future__ import annotations

import os
import random

import pytest

from driver import errors
from driver.backup import Manifest, SnapshotRecord
from driver.core.backups import prune_plan
from driver.ctl import main as ctl
from tests.backup.conftest import S3Server, make_repo
from tests.backup.images import rand_chunks, write_image

CHUNK = 64 << 10


def manifest(sid: str, vol: str, created: str, cluster: str = "c1") -> Manifest:
    return Manifest(sid, vol, "", 1, "", 512, created, cluster)


def test_plan_keeps_newest_per_volume_of_this_cluster_only() -> None:
    ms = [
        manifest("s-a1", "v-a", "2026-01-01T00:00:00Z"),
        manifest("s-a3", "v-a", "2026-01-03T00:00:00Z"),
        manifest("s-a2", "v-a", "2026-01-02T00:00:00Z"),
        manifest("s-b1", "v-b", "2026-01-01T00:00:00Z"),
        manifest("s-x0", "v-a", "2025-01-01T00:00:00Z", cluster="other"),
    ]
    assert [m.snapshot_id for m in prune_plan(ms, 2, "c1")] == ["s-a1"]
    assert [m.snapshot_id for m in prune_plan(ms, 1, "c1")] == ["s-a2", "s-a1"]
    assert [m.snapshot_id for m in prune_plan(ms, 1, "c1", volume="v-b")] == []
    assert [m.snapshot_id for m in prune_plan(ms, 1, "other")] == []
    with pytest.raises(errors.InvalidArgument):
        prune_plan(ms, 0, "c1")


def test_prune_through_stowagectl(s3: S3Server, tmp_path: object,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3.make_bucket()
    img = os.path.join(str(tmp_path), "a.img")
    write_image(img, 8 * CHUNK, CHUNK, rand_chunks(random.Random(3), [0, 2, 5], CHUNK))
    mine = make_repo(s3, bucket, prefix="r")
    theirs = make_repo(s3, bucket, prefix="r", cluster_id="cluster-b")
    for day, sid, vol in ((1, "s-1", "v-1"), (2, "s-2", "v-1"), (3, "s-3", "v-1"),
                          (1, "s-4", "v-2")):
        mine.backup(img, SnapshotRecord(sid, vol, created=f"2026-01-0{day}T00:00:00Z"))
    theirs.backup(img, SnapshotRecord("s-0", "v-1", created="2025-12-01T00:00:00Z"))
    key_file = os.path.join(str(tmp_path), "key")
    with open(key_file, "w", encoding="ascii") as fh:
        fh.write(bytes(range(32)).hex())
    creds = ["--backup-target", f"t1=s3://{bucket}/r?endpoint={s3.endpoint}",
             "--backup-key-file", key_file, "--cluster-id", "cluster-a"]

    assert ctl.main(["backup", "prune", "--keep-last", "1", "--dry-run", *creds]) == 0
    assert "would delete" in capsys.readouterr().out
    assert len(mine.list()) == 5  # a dry run deletes nothing
    assert ctl.main(["backup", "prune", "--keep-last", "1", "--volume", "v-2", *creds]) == 0
    assert len(mine.list()) == 5  # v-2 has one backup: nothing to prune
    assert ctl.main(["backup", "prune", "--keep-last", "1", *creds]) == 0
    assert sorted(s.snapshot_id for s in mine.list()) == ["s-0", "s-3", "s-4"]
    assert mine.verify("s-3").ok  # what stays is whole; the others' chunks wait for gc
    assert ctl.main(["backup", "prune", "--keep-last", "0", *creds]) != 0
