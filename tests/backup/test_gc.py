"""Garbage collection against real S3 servers: the two-pass protocol, writers racing it.

Server timestamps have one-second resolution, so a few tests sleep a little over a second or two
to put a backup's start clearly after a candidate list (the protocol's CLOCK_MARGIN).
"""

from __future__ import annotations

import os
import random
import threading
import time

from driver.backup import Progress, Repository, SnapshotRecord
from driver.backup.engine import CLOCK_MARGIN
from tests.backup.conftest import RepoFactory
from tests.backup.images import rand_chunks, write_image

CHUNK = 64 << 10


def image(tmp_path: object, name: str, seed: int, n: int = 12) -> str:
    rng = random.Random(seed)
    path = os.path.join(str(tmp_path), name)
    write_image(path, n * CHUNK, CHUNK, rand_chunks(rng, list(range(n)), CHUNK))
    return path


def rec(sid: str) -> SnapshotRecord:
    return SnapshotRecord(sid, "v-" + sid)


def unreferenced_bytes(repo: Repository) -> int:
    refs: set[str] = set()
    for s in repo.list():
        refs |= repo.show(s.snapshot_id).chunk_ids()
    return sum(o.size for o in repo.store.list("chunks/") if o.key.rsplit("/", 1)[-1] not in refs)


def all_verify(repo: Repository) -> None:
    for s in repo.list():
        report = repo.verify(s.snapshot_id)
        assert report.ok, (s.snapshot_id, report.damaged)


def test_two_passes_reclaim_unreferenced(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    repo.backup(image(tmp_path, "a", 1), rec("s-a"))
    repo.backup(image(tmp_path, "b", 2), rec("s-b"))
    repo.delete("s-a")
    before = unreferenced_bytes(repo)
    assert before > 0
    time.sleep(1.1)  # chunks strictly older than the candidate list
    first = repo.gc(min_candidate_age=0)
    assert first.candidate_bytes == before and first.deleted_chunks == 0
    assert unreferenced_bytes(repo) == before  # pass 1 deletes nothing
    second = repo.gc(min_candidate_age=0)
    assert second.swept and second.deleted_bytes == before
    assert unreferenced_bytes(repo) == 0
    all_verify(repo)


def test_young_candidates_wait(repo_factory: RepoFactory, tmp_path: object) -> None:
    repo = repo_factory()
    repo.backup(image(tmp_path, "a", 1), rec("s-a"))
    repo.delete("s-a")
    repo.gc()
    report = repo.gc(min_candidate_age=3600)
    assert report.postponed and "old" in report.postponed
    assert report.deleted_chunks == 0


def _paused_backup(repo: Repository, path: str, sid: str, at_fraction: float
                   ) -> tuple[threading.Thread, threading.Event, threading.Event, list[object]]:
    """A backup in a thread that stops at `at_fraction` of the image until released."""
    reached, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def progress(p: Progress) -> None:
        if p.done_bytes >= p.total_bytes * at_fraction and not reached.is_set():
            reached.set()
            assert release.wait(120)

    def run() -> None:
        try:
            outcome.append(repo.backup(path, rec(sid), progress=progress))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert reached.wait(120), outcome
    return t, reached, release, outcome


def test_sweep_postponed_by_writer_older_than_candidates(repo_factory: RepoFactory,
                                                         tmp_path: object) -> None:
    """A backup running since before the mark may have deduplicated against a chunk that became
    a candidate without seeing the list: no sweep while it runs."""
    repo = repo_factory(workers=1)
    a = image(tmp_path, "a", 1)
    repo.backup(a, rec("s-a"))
    time.sleep(1.1)
    # the writer dedups every chunk against s-a's, then pauses before its manifest
    t, _, release, outcome = _paused_backup(repo_factory(workers=1), a, "s-b", 1.0)
    try:
        repo.delete("s-a")
        time.sleep(1.1)
        mark = repo.gc(min_candidate_age=0)
        assert mark.candidates > 0
        sweep = repo.gc(min_candidate_age=0)
        assert sweep.postponed and "before the candidate list" in sweep.postponed
        assert sweep.deleted_chunks == 0
    finally:
        release.set()
        t.join()
    assert not isinstance(outcome[0], BaseException), outcome
    all_verify(repo)
    assert repo.verify("s-b").chunks > 0


def test_writer_after_mark_claims_candidates(repo_factory: RepoFactory, tmp_path: object) -> None:
    """A backup that starts after the mark and needs candidate chunks claims and re-uploads them;
    a sweep during that backup leaves them alone."""
    repo = repo_factory(workers=1)
    a = image(tmp_path, "a", 1)
    repo.backup(a, rec("s-a"))
    repo.delete("s-a")
    time.sleep(1.1)
    assert repo.gc(min_candidate_age=0).candidates > 0
    time.sleep(CLOCK_MARGIN + 1.1)
    t, _, release, outcome = _paused_backup(repo_factory(workers=1), a, "s-b", 0.5)
    try:
        sweep = repo.gc(min_candidate_age=0)
        assert sweep.postponed is None and sweep.swept
    finally:
        release.set()
        t.join()
    assert not isinstance(outcome[0], BaseException), outcome
    all_verify(repo)


def test_writers_racing_gc(repo_factory: RepoFactory, tmp_path: object) -> None:
    """Two writers back up overlapping images and delete their older backups while GC passes
    run back to back: every manifest stays restorable; two quiet passes then reclaim >= 95%."""
    repo = repo_factory()
    pool = [image(tmp_path, f"img{i}", 100 + i, n=6) for i in range(4)]
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        mine = repo_factory(workers=2)
        prev: str | None = None
        try:
            for n in range(4):
                sid = f"s-w{w}-{n}"
                mine.backup(rng.choice(pool), rec(sid))
                if prev is not None and rng.random() < 0.7:
                    mine.delete(prev)
                prev = sid
        except BaseException as exc:
            failures.append(exc)

    def collector() -> None:
        gc = repo_factory()
        try:
            while not stop.is_set():
                gc.gc(min_candidate_age=0)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2)]
    collector_thread = threading.Thread(target=collector)
    collector_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    collector_thread.join()
    assert not failures, failures
    all_verify(repo)
    # Quiet passes: everything unreferenced goes (>= 95% of its bytes).
    for s in repo.list()[:-2]:
        repo.delete(s.snapshot_id)
    before = unreferenced_bytes(repo)
    time.sleep(1.1)
    repo.gc(min_candidate_age=0)
    repo.gc(min_candidate_age=0)
    assert unreferenced_bytes(repo) <= before * 0.05
    all_verify(repo)


def test_claimed_candidates_survive_the_sweep(repo_factory: RepoFactory, tmp_path: object) -> None:
    """A writer that claimed a candidate (in its in-flight marker) but has not re-uploaded it yet
    keeps it: the sweep reads claims after announcing itself."""
    import json

    from driver.backup.engine import MARKERS_PREFIX

    repo = repo_factory()
    repo.backup(image(tmp_path, "a", 1), rec("s-a"))
    ids = sorted(repo.show("s-a").chunk_ids())
    repo.delete("s-a")
    time.sleep(1.1)
    repo.gc(min_candidate_age=0)
    _, t_mark = repo.store.get_with_time("gc/candidates")
    repo.store.put(MARKERS_PREFIX + "writer-x", json.dumps(
        {"snapshot_id": "s-x", "started": t_mark + 10, "claims": ids[:3]}).encode())
    report = repo.gc(min_candidate_age=0)
    assert report.swept and report.deleted_chunks == len(ids) - 3
    left = {o.key.rsplit("/", 1)[-1] for o in repo.store.list("chunks/")}
    assert left == set(ids[:3])


def test_candidate_uploaded_again_after_the_mark_is_kept(repo_factory: RepoFactory,
                                                         tmp_path: object) -> None:
    """The sweep deletes only candidates not written since the candidate list."""
    repo = repo_factory()
    repo.backup(image(tmp_path, "a", 1), rec("s-a"))
    ids = sorted(repo.show("s-a").chunk_ids())
    repo.delete("s-a")
    time.sleep(1.1)
    repo.gc(min_candidate_age=0)
    time.sleep(1.1)
    name = f"chunks/{ids[0][:2]}/{ids[0]}"
    repo.store.put(name, repo.store.get(name))
    report = repo.gc(min_candidate_age=0)
    assert report.swept and report.deleted_chunks == len(ids) - 1
    assert repo.store.head(name) is not None
