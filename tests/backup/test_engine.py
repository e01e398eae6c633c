"""The backup engine against real S3 servers (SeaweedFS and rclone): every test runs on both."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from driver import errors
from driver.backup import Progress, Repository, SnapshotRecord
from driver.backup.format import chunk_key_name
from tests.backup.conftest import OTHER_KEY, RepoFactory, S3Server, make_repo
from tests.backup.images import allocated_bytes, rand_chunks, sha256, write_image

CHUNK = 64 << 10


def rec(sid: str, vol: str = "v-1") -> SnapshotRecord:
    return SnapshotRecord(sid, vol, name="pvc-x", filesystem="xfs", sector_size=512)


def make_image(tmp_path: object, name: str, seed: int = 1, nchunks: int = 64,
               data_idx: list[int] | None = None) -> tuple[str, dict[int, bytes]]:
    rng = random.Random(seed)
    idx = data_idx if data_idx is not None else sorted(rng.sample(range(nchunks), nchunks // 2))
    chunks = rand_chunks(rng, idx, CHUNK)
    path = os.path.join(str(tmp_path), name)
    write_image(path, nchunks * CHUNK + 12345, CHUNK, chunks)  # a partial last chunk too
    return path, chunks


@pytest.mark.parametrize("per", [1, 4])
def test_full_and_incremental_restore_byte_exact_and_sparse(repo_factory: RepoFactory,
                                                            s3: S3Server, tmp_path: object,
                                                            per: int) -> None:
    """Blocks of CHUNK bytes, chunks of `per` blocks. /tmp cannot share extents, so the
    incremental backup compares blocks with the local base copy (read-and-hash) and uploads only
    the changed blocks, pointing into the base's chunks for the rest."""
    repo = repo_factory(chunk_size=per * CHUNK, block_size=CHUNK)
    img, chunks = make_image(tmp_path, "a.img")
    seen: list[Progress] = []
    r1 = repo.backup(img, rec("s-1"), progress=seen.append)
    assert r1.mode == "full"
    assert r1.uploaded_chunks == _runs(sorted(chunks), per)
    assert r1.hole_chunks == 65 - len(chunks)
    assert seen and seen[-1].done_bytes == seen[-1].total_bytes == os.path.getsize(img)

    # Incremental: change 3 chunks, zero one, append data; the base copy is the old image.
    base = os.path.join(str(tmp_path), "a.base")
    shutil.copyfile(img, base)
    rng = random.Random(7)
    changed_idx = sorted(chunks)[:3]
    with open(img, "r+b") as fh:
        for i in changed_idx:
            fh.seek(i * CHUNK)
            fh.write(rng.randbytes(CHUNK))
        fh.seek(sorted(chunks)[5] * CHUNK)
        fh.write(bytes(CHUNK))
    r2 = repo.backup(img, rec("s-2"), base=(base, r1.manifest))
    assert r2.mode in ("read-and-hash", "extents")
    assert r2.uploaded_chunks == _runs(changed_idx, per)
    assert r2.uploaded_bytes < (len(changed_idx) + 1) * CHUNK
    assert r2.manifest.base_snapshot_id == "s-1"
    if per > 1:
        assert any(c.skip for c in r2.manifest.chunks)

    for sid, src in (("s-1", base), ("s-2", img)):
        out = os.path.join(str(tmp_path), f"restored-{sid}")
        m = repo.restore(sid, out)
        assert m.size == os.path.getsize(src)
        assert sha256(out) == sha256(src)
        # Holes stay holes: no more is allocated than the source's data blocks.
        data = sum(c.length for c in m.chunks if c.id is not None)
        assert allocated_bytes(out) <= data + 4096
        assert not os.path.exists(out + ".stowage-partial")
        assert not os.path.exists(out + ".stowage-restore")
    assert {s.snapshot_id for s in repo.list()} == {"s-1", "s-2"}
    assert repo.show("s-2").source_volume_id == "v-1"
    assert repo.verify("s-2").ok
    third = os.path.join(str(tmp_path), "third.img")
    _documented_restore(repo, s3, "s-2", third, str(tmp_path))
    assert sha256(third) == sha256(img)


def test_backup_is_idempotent(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    img, _ = make_image(tmp_path, "a.img")
    r1 = repo.backup(img, rec("s-1"))
    r2 = repo.backup(img, rec("s-1"))
    assert r2.already_done and r2.uploaded_chunks == 0
    assert r2.manifest.chunk_ids() == r1.manifest.chunk_ids()


def test_dedup_across_volumes(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    a, chunks = make_image(tmp_path, "a.img", seed=3)
    b = os.path.join(str(tmp_path), "b.img")
    shutil.copyfile(a, b)
    with open(b, "r+b") as fh:  # one chunk differs
        fh.seek(sorted(chunks)[0] * CHUNK)
        fh.write(os.urandom(CHUNK))
    ra = repo.backup(a, rec("s-a", "v-a"))
    rb = repo.backup(b, rec("s-b", "v-b"))
    assert ra.uploaded_chunks == len(chunks)
    assert rb.uploaded_chunks == 1
    assert rb.reused_chunks == len(chunks) - 1


def test_wrong_key_fails_clearly_and_writes_nothing(repo_factory: RepoFactory,
                                                    tmp_path: object) -> None:
    repo = repo_factory()
    img, _ = make_image(tmp_path, "a.img", nchunks=8)
    repo.backup(img, rec("s-1"))
    other = repo_factory(OTHER_KEY)
    out = os.path.join(str(tmp_path), "out.img")
    with pytest.raises(errors.FailedPrecondition, match="key ID"):
        other.restore("s-1", out)
    assert sorted(os.listdir(str(tmp_path))) == ["a.img"]
    with pytest.raises(errors.FailedPrecondition, match="another backup key"):
        other.backup(img, rec("s-2"))
    with pytest.raises(errors.NotFound):
        repo.restore("s-nope", out)


def _damage(repo: Repository, cid: str, how: str) -> None:
    name = chunk_key_name(cid)
    if how == "delete":
        repo.store.delete(name)
    else:
        blob = bytearray(repo.store.get(name))
        blob[len(blob) // 2] ^= 0x40
        repo.store.put(name, bytes(blob))


@pytest.mark.parametrize("how", ["corrupt", "delete"])
def test_damaged_chunk_is_data_loss(repo_factory: RepoFactory, tmp_path: object,
                                    how: str) -> None:
    repo = repo_factory()
    img, _ = make_image(tmp_path, "a.img", nchunks=16)
    m = repo.backup(img, rec("s-1")).manifest
    victim = sorted(m.chunk_ids())[2]
    assert repo.verify("s-1").ok
    _damage(repo, victim, how)
    out = os.path.join(str(tmp_path), "out.img")
    with pytest.raises(errors.DataLoss, match=victim):
        repo.restore("s-1", out)
    assert not os.path.exists(out)
    report = repo.verify("s-1")
    assert not report.ok
    assert list(report.damaged) == [victim]
    assert report.verified == report.chunks - 1


def test_swapped_chunk_fails_authentication(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    img, _ = make_image(tmp_path, "a.img", nchunks=16)
    ids = sorted(repo.backup(img, rec("s-1")).manifest.chunk_ids())
    repo.store.put(chunk_key_name(ids[0]), repo.store.get(chunk_key_name(ids[1])))
    with pytest.raises(errors.DataLoss, match=ids[0]):
        repo.restore("s-1", os.path.join(str(tmp_path), "out.img"))


def test_restore_resumes_after_interruption(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory(workers=2)
    img, chunks = make_image(tmp_path, "a.img", nchunks=240, data_idx=list(range(0, 240, 2)))
    repo.backup(img, rec("s-1"))
    out = os.path.join(str(tmp_path), "out.img")

    class Crash(Exception):
        pass

    def crash(p: Progress) -> None:
        if p.done_bytes > p.total_bytes * 3 // 4:  # holes are half the bytes
            raise Crash

    with pytest.raises(Crash):
        repo.restore("s-1", out, progress=crash)
    assert not os.path.exists(out)
    assert os.path.exists(out + ".stowage-restore")

    fetched: list[str] = []
    fresh = repo_factory(workers=2)  # a new process would build a new repository object
    real_get = fresh.store.get

    def counting_get(key: str) -> bytes:
        fetched.append(key)
        return real_get(key)

    fresh.store.get = counting_get  # type: ignore[method-assign]
    fresh.restore("s-1", out)
    chunk_gets = [k for k in fetched if k.startswith("chunks/")]
    assert 0 < len(chunk_gets) < len(chunks) * 3 // 4
    assert sha256(out) == sha256(img)
    assert not os.path.exists(out + ".stowage-restore")


def test_restore_refuses_existing_target(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    img, _ = make_image(tmp_path, "a.img", nchunks=4)
    repo.backup(img, rec("s-1"))
    with pytest.raises(errors.AlreadyExists):
        repo.restore("s-1", img)


def test_delete_removes_manifest_only(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    img, chunks = make_image(tmp_path, "a.img", nchunks=8)
    repo.backup(img, rec("s-1"))
    repo.delete("s-1")
    repo.delete("s-1")  # idempotent
    assert repo.list() == []
    assert len(list(repo.store.list("chunks/"))) == len(chunks)


def test_store_down_mid_upload_then_retry(own_s3: S3Server, tmp_path: object) -> None:
    bucket = own_s3.make_bucket()
    repo = make_repo(own_s3, bucket, workers=2, max_attempts=1)
    img, chunks = make_image(tmp_path, "a.img", nchunks=90, data_idx=list(range(90)))

    def kill_midway(p: Progress) -> None:
        if p.done_bytes > p.total_bytes // 3 and own_s3.proc is not None:
            own_s3.stop()

    with pytest.raises(errors.Unavailable):
        repo.backup(img, rec("s-1"), progress=kill_midway)
    own_s3.start()
    repo = make_repo(own_s3, bucket, workers=2, max_attempts=3)
    assert repo.list() == []  # no manifest was written
    stored_before = {o.key for o in repo.store.list("chunks/")}
    assert 0 < len(stored_before) < len(chunks)
    r = repo.backup(img, rec("s-1"))
    assert r.uploaded_chunks == len(chunks) - len(stored_before)
    assert repo.verify("s-1").ok

    # Down during a restore: UNAVAILABLE, then it completes.
    out = os.path.join(str(tmp_path), "out.img")

    def kill_restore(p: Progress) -> None:
        if p.done_bytes > p.total_bytes // 3 and own_s3.proc is not None:
            own_s3.stop()

    repo1 = make_repo(own_s3, bucket, workers=2, max_attempts=1)
    with pytest.raises(errors.Unavailable):
        repo1.restore("s-1", out, progress=kill_restore)
    assert not os.path.exists(out)
    own_s3.start()
    make_repo(own_s3, bucket, workers=2).restore("s-1", out)
    assert sha256(out) == sha256(img)


def test_unreachable_store(tmp_path: object, s3: S3Server) -> None:
    from tests.backup.conftest import free_port

    srv = S3Server("rclone", str(tmp_path), port=free_port())  # never started
    repo = make_repo(srv, "bucket1", max_attempts=1)
    img, _ = make_image(tmp_path, "a.img", nchunks=2)
    with pytest.raises(errors.Unavailable):
        repo.backup(img, rec("s-1"))
    with pytest.raises(errors.Unavailable):
        repo.restore("s-1", os.path.join(str(tmp_path), "out"))


def test_access_denied_and_missing_bucket(s3: S3Server, tmp_path: object) -> None:
    bucket = s3.make_bucket()
    img, _ = make_image(tmp_path, "a.img", nchunks=2)
    bad = make_repo(s3, bucket, secret="not-the-secret", max_attempts=1)
    with pytest.raises(errors.PermissionDenied) as exc:
        bad.backup(img, rec("s-1"))
    assert "not-the-secret" not in str(exc.value)
    missing = make_repo(s3, "nosuchbucket" + bucket[-6:], max_attempts=1)
    with pytest.raises(errors.FailedPrecondition, match="bucket does not exist"):
        missing.backup(img, rec("s-1"))
    with pytest.raises(errors.FailedPrecondition, match="bucket does not exist"):
        missing.gc()


def _runs(blocks: list[int], per_chunk: int) -> int:
    """How many chunks runs of these block indexes make: a run ends at a region boundary."""
    return sum(
        1 for i in blocks if not (i - 1 in blocks and (i - 1) // per_chunk == i // per_chunk)
    )


@pytest.mark.root
@pytest.mark.parametrize("blocks_per_chunk", [1, 4])
def test_incremental_from_extent_maps_on_xfs(repo_factory: RepoFactory, s3: S3Server,
                                             blocks_per_chunk: int) -> None:
    """On a reflink pool the second backup reads only the blocks the extent maps name: a 3%
    rewrite reads and uploads 3%, an unchanged snapshot reads nothing. With chunks of four
    blocks, the unchanged blocks of a chunk around a changed one stay references into it, and
    Stowage's restore and the documented procedure both put them back."""
    from driver.backup import extents
    from tests.backup.pools import M, make_pool

    pool_gen = make_pool("xfs")
    pool = next(pool_gen)
    try:
        repo = repo_factory(chunk_size=blocks_per_chunk * M, block_size=M)
        n = 96
        img = os.path.join(pool, "vol.img")
        write_image(img, n * M, M, {i: (f"volume chunk {i} ".encode() * (M // 16 + 1))[:M]
                                    for i in range(n)})
        r1 = repo.backup(img, rec("s-1"))
        assert r1.read_bytes == n * M and r1.uploaded_chunks == n // blocks_per_chunk
        base = os.path.join(pool, "base.img")
        extents.reflink(img, base)  # the local base kept after upload

        rng = random.Random(3)
        touched = sorted(rng.sample(range(n), 3))
        with open(img, "r+b") as fh:
            for i in touched:
                fh.seek(i * M)
                fh.write(rng.randbytes(M))
            fh.flush()
            os.fsync(fh.fileno())
        snap = os.path.join(pool, "snap2.img")
        extents.reflink(img, snap)
        r2 = repo.backup(snap, rec("s-2"), base=(base, r1.manifest))
        assert r2.mode == "extents"
        assert r2.read_bytes == len(touched) * M
        assert r2.uploaded_chunks == _runs(touched, blocks_per_chunk)
        assert r2.reused_chunks == n - len(touched)
        if blocks_per_chunk > 1:  # some blocks are read from the middle of an older chunk
            assert any(c.skip for c in r2.manifest.chunks)

        snap3 = os.path.join(pool, "snap3.img")
        extents.reflink(snap, snap3)
        r3 = repo.backup(snap3, rec("s-3"), base=(snap, r2.manifest))
        assert (r3.mode, r3.read_bytes, r3.uploaded_chunks) == ("extents", 0, 0)
        assert r3.manifest.chunks == r2.manifest.chunks

        out = os.path.join(pool, "restored.img")
        repo.restore("s-3", out)
        assert sha256(out) == sha256(img)
        third = os.path.join(pool, "third.img")
        _documented_restore(repo, s3, "s-3", third, pool)
        assert sha256(third) == sha256(img)
    finally:
        pool_gen.close()


def test_chunks_are_runs_of_blocks_within_a_region(repo_factory: RepoFactory,
                                                   tmp_path: object) -> None:
    """With four blocks per chunk: a region's data blocks are one chunk, split at holes and
    all-zero blocks, never across regions; the restore is byte-exact and sparse; a volume with
    one changed block shares every other chunk."""
    b = CHUNK
    repo = repo_factory(chunk_size=4 * b, block_size=b)
    rng = random.Random(5)
    data = {i: rng.randbytes(b) for i in (0, 1, 2, 3, 4, 6, 7, 9, 10, 12)}
    data[5] = bytes(b)  # written zeros: allocated, but a hole in the backup
    img = os.path.join(str(tmp_path), "a.img")
    write_image(img, 13 * b + 777, b, data)
    with open(img, "r+b") as fh:  # a partial last block with data
        fh.seek(13 * b)
        fh.write(b"tail" * 100)
    r = repo.backup(img, rec("s-1"))
    entries = [(c.offset // b, -(-c.length // b), c.id is not None, c.skip)
               for c in r.manifest.chunks]
    assert entries == [(0, 4, True, 0), (4, 1, True, 0), (5, 1, False, 0), (6, 2, True, 0),
                       (8, 1, False, 0), (9, 2, True, 0), (11, 1, False, 0), (12, 2, True, 0)]
    assert r.uploaded_chunks == 5 and r.manifest.block_size == b
    assert r.manifest.chunk_size == 4 * b and r.manifest.version == 2
    out = os.path.join(str(tmp_path), "out.img")
    repo.restore("s-1", out)
    assert sha256(out) == sha256(img)
    assert allocated_bytes(out) <= 11 * b + 4096

    other = os.path.join(str(tmp_path), "b.img")
    shutil.copyfile(img, other)
    with open(other, "r+b") as fh:
        fh.seek(10 * b)
        fh.write(rng.randbytes(b))
    r2 = repo.backup(other, rec("s-2", "v-2"))
    assert r2.uploaded_chunks == 1  # only the region holding block 10
    assert repo.verify("s-2").ok


def _documented_restore(repo: Repository, s3: S3Server, snapshot: str, dest: str,
                        work: str) -> None:
    """Run the procedure in docs/backup-format.md §8 as written, placeholders filled in."""
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "backup-format.md")
    with open(path, encoding="utf-8") as fh:
        doc = fh.read()
    code = re.search(r"## 8\..*?```python\n(.*?)```", doc, re.S)
    assert code is not None
    script = code.group(1)
    key_file = os.path.join(work, "backup.key")
    with open(key_file, "w") as fh:
        fh.write(bytes(range(32)).hex() + "\n")
    for old, new in (("backup.key", key_file), ("http://HOST:PORT", s3.endpoint),
                     ('"BUCKET"', repr(repo.store.target.bucket)),
                     ('"PREFIX/"', repr(repo.store.target.prefix + "/")),
                     ('"SNAPSHOT_ID"', repr(snapshot)),
                     ('"restored.img"', repr(dest))):
        assert old in script, old
        script = script.replace(old, new)
    exec(compile(script, "backup-format.md", "exec"), {})


def test_documented_third_party_restore(repo_factory: RepoFactory, s3: S3Server,
                                        tmp_path: object) -> None:
    """The procedure in docs/backup-format.md §8 restores a Stowage backup byte for byte
    without Stowage's code (chunks of several blocks; the xfs test adds entries with a skip)."""
    repo = repo_factory(chunk_size=4 * CHUNK, block_size=CHUNK)
    img, _ = make_image(tmp_path, "a.img", nchunks=12)
    repo.backup(img, rec("s-doc"))
    third = os.path.join(str(tmp_path), "third.img")
    _documented_restore(repo, s3, "s-doc", third, str(tmp_path))
    assert sha256(third) == sha256(img)


def test_open_from_target_and_environment(s3: S3Server, tmp_path: object) -> None:
    from driver.backup import RepositoryKey, parse_target

    bucket = s3.make_bucket()
    target = parse_target(f"main=s3://{bucket}?endpoint={s3.endpoint}")
    key = RepositoryKey.parse(bytes(range(32)).hex())
    repo = Repository.open(target, key, "cluster-b", workers=2, rate_limit=1 << 30,
                           chunk_size=CHUNK)
    img, _ = make_image(tmp_path, "a.img", nchunks=4)
    repo.backup(img, rec("s-1"))
    assert repo.show("s-1").cluster_id == "cluster-b"
    assert [s.snapshot_id for s in repo.list()] == ["s-1"]


def test_restore_into_missing_directory_is_a_clear_error(repo_factory: RepoFactory,
                                                         tmp_path: object) -> None:
    repo = repo_factory()
    img, _ = make_image(tmp_path, "a.img", nchunks=4)
    repo.backup(img, rec("s-1"))
    with pytest.raises(errors.NotFound, match="restoring to"):
        repo.restore("s-1", os.path.join(str(tmp_path), "no", "such", "dir", "out.img"))


def test_version_1_backup_restores_and_serves_as_base(repo_factory: RepoFactory,
                                                      tmp_path: object) -> None:
    """A backup written by a version-1 Stowage (one block per chunk) still restores, and a
    version-2 backup of the same volume can use it as its base."""
    from driver.backup.format import manifest_key_name, seal_manifest

    old = repo_factory(chunk_size=CHUNK)
    img, _ = make_image(tmp_path, "a.img", nchunks=16)
    m1 = old.backup(img, rec("s-1")).manifest
    m1.version = 1  # as the version-1 writer stored it: no block size, no skips
    old.store.put(manifest_key_name("s-1"), seal_manifest(old.key, m1))
    out = os.path.join(str(tmp_path), "out.img")
    assert old.restore("s-1", out).version == 1
    assert sha256(out) == sha256(img)

    new = repo_factory(chunk_size=4 * CHUNK, block_size=CHUNK)
    r2 = new.backup(img, rec("s-2"), base=(out, old.show("s-1")))
    assert r2.manifest.base_snapshot_id == "s-1" and r2.manifest.version == 2
    assert r2.uploaded_chunks == 0  # every block equals the base's: its chunks are reused
    out2 = os.path.join(str(tmp_path), "out2.img")
    new.restore("s-2", out2)
    assert sha256(out2) == sha256(img)


def test_base_with_larger_chunks(repo_factory: RepoFactory, tmp_path: object) -> None:
    """A base made with larger chunks (another configuration) is still a base: the new
    manifest's chunk size covers the base's chunks it points into, and it restores."""
    big = repo_factory(chunk_size=8 * CHUNK, block_size=CHUNK)
    img, _ = make_image(tmp_path, "a.img", nchunks=32, data_idx=list(range(32)))
    base = os.path.join(str(tmp_path), "base.img")
    shutil.copyfile(img, base)
    r1 = big.backup(img, rec("s-1"))
    with open(img, "r+b") as fh:
        fh.seek(3 * CHUNK)
        fh.write(os.urandom(CHUNK))
    small = repo_factory(chunk_size=4 * CHUNK, block_size=CHUNK)
    r2 = small.backup(img, rec("s-2"), base=(base, r1.manifest))
    assert r2.uploaded_chunks == 1 and r2.manifest.chunk_size == 8 * CHUNK
    out = os.path.join(str(tmp_path), "out.img")
    small.restore("s-2", out)
    assert sha256(out) == sha256(img)


def test_entry_past_its_chunk_is_damage(repo_factory: RepoFactory, tmp_path: object) -> None:
    """A manifest entry naming bytes its chunk does not have: verify reports the chunk, restore
    is DATA_LOSS, nothing is left behind."""
    from driver.backup.format import ChunkRef, manifest_key_name, seal_manifest

    repo = repo_factory(chunk_size=4 * CHUNK, block_size=CHUNK)
    img, _ = make_image(tmp_path, "a.img", nchunks=8, data_idx=[0, 4, 5])
    m = repo.backup(img, rec("s-1")).manifest
    i, one = next((i, c) for i, c in enumerate(m.chunks) if c.id and c.length == CHUNK)
    m.chunks[i] = ChunkRef(one.offset, one.length, one.id, CHUNK)  # past its one block
    repo.store.put(manifest_key_name("s-1"), seal_manifest(repo.key, m))
    report = repo.verify("s-1")
    assert not report.ok and "shorter" in report.damaged[str(one.id)]
    out = os.path.join(str(tmp_path), "out.img")
    with pytest.raises(errors.DataLoss, match="wrong length"):
        repo.restore("s-1", out)
    assert not os.path.exists(out)
