"""Group commit in driver.storage.store.Store: durability on return, savepoint isolation between
writers of one batch, readers that only see committed rows, and a failed COMMIT reaching every
writer of its batch.

A batch is made deterministic by holding the first COMMIT (the hook blocks while the store's
lock is held) until the other writers are queued for the lock."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from driver.errors import ResourceExhausted, StowageError, Unavailable
from driver.storage.store import Store
from tests.unit.fakes import HookedConnection, sqlite_full
from tests.unit.test_state_locks import vol


class Gate:
    """Installed as the store's write connection hook: counts COMMITs, holds the first one
    until released, and can fail chosen statements."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.commits = 0
        self.holding = threading.Event()
        self.release = threading.Event()
        self.hold_first = True
        self.fail: Callable[[str, int], None] | None = None  # (sql, COMMITs including this)
        store._db = HookedConnection(store._db, self._hook)  # type: ignore[assignment]

    def _hook(self, sql: str) -> None:
        if sql == "COMMIT":
            self.commits += 1
        if self.fail is not None:
            self.fail(sql, self.commits)
        if sql == "COMMIT" and self.hold_first and self.commits == 1:
            self.holding.set()
            assert self.release.wait(10), "test never released the first COMMIT"


def run(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    return t, errors


def wait_queued(store: Store, n: int) -> None:
    deadline = time.monotonic() + 10
    while store._arrivals < n:
        assert time.monotonic() < deadline, f"{store._arrivals} of {n} writers queued"
        time.sleep(0.001)


def held_batch(
    store: Store, gate: Gate, writers: list[Callable[[], object]],
    while_held: Callable[[], None] = lambda: None,
) -> tuple[list[BaseException], list[list[BaseException]]]:
    """Write vol(1) and hold its COMMIT; queue `writers` behind it (they will form one batch);
    call `while_held`; release. Returns the first writer's errors and each queued one's."""
    first, e0 = run(lambda: store.add_volume(vol(1)))
    assert gate.holding.wait(10)
    batch = [run(w) for w in writers]
    wait_queued(store, len(writers))
    while_held()
    gate.release.set()
    for t, _ in [(first, e0), *batch]:
        t.join(10)
        assert not t.is_alive()
    return e0, [errors for _, errors in batch]


def committed_ids(path: str) -> set[str]:
    """What another process would see: a fresh connection reads only committed rows."""
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT id FROM volumes")}
    finally:
        con.close()


@pytest.fixture
def db_path(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(str(tmp_path), "meta.db")


@pytest.fixture
def gstore(db_path: str) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def test_concurrent_writers_are_committed_when_they_return(db_path: str, gstore: Store) -> None:
    n = 48
    barrier = threading.Barrier(n)
    seen: dict[int, bool] = {}

    def writer(i: int) -> None:
        barrier.wait()
        gstore.add_volume(vol(i))
        seen[i] = vol(i).id in committed_ids(db_path)
        gstore.set_volume_size(vol(i).id, 2 * 4096 * i)

    threads = [run(lambda i=i: writer(i)) for i in range(1, n + 1)]
    for t, errors in threads:
        t.join(30)
        assert not t.is_alive() and errors == []
    assert seen == {i: True for i in range(1, n + 1)}
    gstore.close()
    reopened = Store(db_path)
    try:
        assert [(v.id, v.size) for v in reopened.list_volumes()] == [
            (vol(i).id, 2 * 4096 * i) for i in range(1, n + 1)
        ]
    finally:
        reopened.close()


def test_one_commit_covers_every_writer_queued_behind_it(db_path: str, gstore: Store) -> None:
    gate = Gate(gstore)

    def nobody_returned() -> None:
        assert committed_ids(db_path) == set()  # held: nothing is durable yet
        assert gate.commits == 1

    e0, errors = held_batch(
        gstore, gate, [lambda i=i: gstore.add_volume(vol(i)) for i in range(2, 10)],
        nobody_returned,
    )
    assert e0 == [] and errors == [[]] * 8
    assert gate.commits == 2  # nine writers, two fsynced COMMITs
    assert committed_ids(db_path) == {vol(i).id for i in range(1, 10)}


def test_a_failing_writer_does_not_lose_the_rows_of_its_batch(
    db_path: str, gstore: Store
) -> None:
    gate = Gate(gstore)

    def raises_after_writing() -> None:
        with gstore._tx() as db:
            db.execute("DELETE FROM volumes")
            raise RuntimeError("caller failed after its statements")

    e0, errors = held_batch(gstore, gate, [
        lambda: gstore.add_volume(vol(2)),
        lambda: gstore.add_volume(vol(5, name=vol(1).name)),  # UNIQUE violation
        raises_after_writing,
        lambda: gstore.add_volume(vol(3)),
        lambda: gstore.add_volume(vol(4)),
    ])
    assert e0 == [] and errors[0] == errors[3] == errors[4] == []
    assert len(errors[1]) == 1 and isinstance(errors[1][0], StowageError)
    assert len(errors[2]) == 1 and isinstance(errors[2][0], RuntimeError)
    assert gate.commits == 2
    assert committed_ids(db_path) == {vol(i).id for i in (1, 2, 3, 4)}


def test_the_last_writer_in_commits_the_batch_even_when_it_fails(
    db_path: str, gstore: Store
) -> None:
    gstore.add_volume(vol(1))
    gate = Gate(gstore)
    gate.hold_first = False

    inside = threading.Event()

    def slow_writer() -> None:
        with gstore._tx() as db:
            db.execute("UPDATE volumes SET size = 1 WHERE id = ?", (vol(1).id,))
            inside.set()
            wait_queued(gstore, 1)  # the failing writer is now waiting for the lock

    slow, e_slow = run(slow_writer)
    assert inside.wait(10)
    failing, e_fail = run(lambda: gstore.add_volume(vol(2, name=vol(1).name)))
    for t in (slow, failing):
        t.join(10)
        assert not t.is_alive()
    assert e_slow == [] and len(e_fail) == 1 and isinstance(e_fail[0], Unavailable)
    assert gate.commits == 1  # committed by the failing writer, which came in last
    got = gstore.get_volume(vol(1).id)
    assert got is not None and got.size == 1


def test_readers_never_see_uncommitted_rows(db_path: str, gstore: Store) -> None:
    gstore.add_volume(vol(1))
    gate = Gate(gstore)
    writer, e_w = run(lambda: gstore.add_volume(vol(2)))
    assert gate.holding.wait(10)  # vol(2) is written in the open transaction, not committed
    seen: list[object] = []

    def reader() -> None:
        seen.append([v.id for v in gstore.list_volumes()])
        seen.append(gstore.get_volume(vol(2).id))
        seen.append(gstore.volume_by_name(vol(2).name))
        seen.append(gstore.counts())

    r, e_r = run(reader)
    r.join(10)  # reads do not wait for the held COMMIT
    assert not r.is_alive() and e_r == []
    assert seen == [[vol(1).id], None, None, (1, 0)]
    assert writer.is_alive()
    gate.release.set()
    writer.join(10)
    assert e_w == []
    assert [v.id for v in gstore.list_volumes()] == [vol(1).id, vol(2).id]


def test_a_failed_commit_reaches_every_writer_of_its_batch(db_path: str) -> None:
    before: list[int] = []
    s = Store(db_path, before_write=lambda: before.append(1))
    try:
        gate = Gate(s)

        def full_at_second_commit(sql: str, commits: int) -> None:
            if sql == "COMMIT" and commits == 2:
                raise sqlite_full()

        gate.fail = full_at_second_commit
        e0, errors = held_batch(s, gate, [lambda i=i: s.add_volume(vol(i)) for i in range(2, 7)])
        assert e0 == []
        for errs in errors:
            assert len(errs) == 1 and isinstance(errs[0], ResourceExhausted)
        assert len(before) == 6  # the reserve hook ran before every writer's statements
        assert committed_ids(db_path) == {vol(1).id}  # the batch was rolled back
        s.add_volume(vol(7))  # and the store goes on
        assert committed_ids(db_path) == {vol(1).id, vol(7).id}
    finally:
        s.close()


def test_a_statement_that_rolls_back_the_whole_transaction_fails_its_batch(
    db_path: str, gstore: Store
) -> None:
    """SQLite may roll back the entire transaction on SQLITE_FULL or an I/O error inside a
    statement: every writer whose rows were in it must then get the error, not a success."""
    gate = Gate(gstore)
    real: sqlite3.Connection = gstore._db._real  # type: ignore[attr-defined]

    def full_in_last_writers_insert(sql: str, commits: int) -> None:
        if commits == 1 and sql.startswith("INSERT") and gstore._arrivals == 0:
            real.execute("ROLLBACK")  # what SQLite does by itself in that case
            raise sqlite_full()

    gate.fail = full_in_last_writers_insert
    writers = [lambda i=i: gstore.add_volume(vol(i)) for i in (2, 3, 4)]
    e0, errors = held_batch(gstore, gate, writers)
    assert e0 == []
    for errs in errors:
        assert len(errs) == 1 and isinstance(errs[0], ResourceExhausted)
    assert committed_ids(db_path) == {vol(1).id}
    gate.fail = None
    gstore.add_volume(vol(5))
    assert committed_ids(db_path) == {vol(1).id, vol(5).id}
