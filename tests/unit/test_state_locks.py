"""driver.storage.store.Store on a tmp sqlite file, and driver.storage.locks.KeyedLocks."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from driver.errors import Aborted, StowageError
from driver.model import (
    AccessMode,
    AccessType,
    ContentSource,
    FsType,
    MiB,
    Publication,
    Snapshot,
    Staging,
    Volume,
)
from driver.storage.locks import KeyedLocks
from driver.storage.store import Store
from tests.unit.fakes import busy


def vol(n: int, name: str | None = None, **kw: object) -> Volume:
    base = dict(
        id=f"v-{n:032x}",
        name=name or f"pvc-{n}",
        size=n * 4096,
        access_type=AccessType.MOUNT,
        fs_type="xfs",
        formatted=False,
        source=None,
        parameters={"fsType": "xfs"},
        created_at=1000.5 + n,
        sector_size=512,
    )
    base.update(kw)
    return Volume(**base)  # type: ignore[arg-type]


def snap(n: int, source: str, name: str | None = None) -> Snapshot:
    return Snapshot(
        f"s-{n:032x}",
        name or f"snap-{n}",
        source,
        4096,
        "ext4",
        AccessType.BLOCK,
        True,
        2000.25,
        True,
        4096,
    )


# --- Store ---------------------------------------------------------------------------------------
def test_volume_round_trip(store: Store) -> None:
    v = vol(1, source=ContentSource("snapshot", "s-" + "a" * 32), formatted=True)
    store.add_volume(v)
    assert store.get_volume(v.id) == v
    assert store.volume_by_name(v.name) == v
    store.set_volume_size(v.id, 8192)
    store.set_formatted(v.id, "ext4")
    got = store.get_volume(v.id)
    assert got is not None and (got.size, got.formatted, got.fs_type) == (8192, True, "ext4")
    store.remove_volume(v.id)
    assert store.get_volume(v.id) is None and store.volume_by_name(v.name) is None
    assert store.get_volume("v-" + "f" * 32) is None


def test_store_persists_across_reopen(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "m.db")
    s = Store(path)
    s.add_volume(vol(7))
    s.close()
    s2 = Store(path)
    try:
        assert s2.get_volume(vol(7).id) == vol(7)
        assert s2.healthy()
    finally:
        s2.close()


def test_open_drops_the_attachments_table_of_older_versions(tmp_path: os.PathLike[str]) -> None:
    """Stores written before the attach-free Controller have an `attachments` table; opening
    one for writing drops it and keeps every other row."""
    path = os.path.join(str(tmp_path), "m.db")
    s = Store(path)
    s.add_volume(vol(3))
    s.close()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE attachments (volume_id TEXT PRIMARY KEY, node_id TEXT NOT NULL)")
    db.execute("INSERT INTO attachments VALUES (?, 'n1')", (vol(3).id,))
    db.commit()
    db.close()
    s = Store(path)
    try:
        assert s.get_volume(vol(3).id) == vol(3)
    finally:
        s.close()
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert "attachments" not in tables and "volumes" in tables


def test_rows_of_older_versions_read_as_typed_filesystems(tmp_path: os.PathLike[str]) -> None:
    """Every version wrote a block volume's filesystem as "" and a mount volume's by name:
    those rows read back as None and as FsType members, and are written the same way."""
    path = os.path.join(str(tmp_path), "m.db")
    Store(path).close()
    db = sqlite3.connect(path)
    for n, access, fs in ((1, "block", ""), (2, "mount", "xfs")):
        db.execute(
            "INSERT INTO volumes (id, name, size, access_type, fs_type, formatted, source_kind,"
            " source_id, parameters, created_at, sector_size) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (f"v-{n:032x}", f"old-{n}", MiB, access, fs, 1, None, None, "{}", 1.0, 4096),
        )
    db.execute(
        "INSERT INTO stagings VALUES (?,?,?,?,?,?,?)",
        (f"v-{1:032x}", "/s", "/dev/loop9", "block", "", 0, "[]"),
    )
    db.commit()
    db.close()
    s = Store(path)
    try:
        block, mount = s.get_volume(f"v-{1:032x}"), s.get_volume(f"v-{2:032x}")
        assert block is not None and block.fs_type is None
        assert mount is not None and mount.fs_type is FsType.XFS
        staging = s.staging(f"v-{1:032x}")
        assert staging is not None and staging.fs_type is None
        s.add_volume(vol(3, access_type=AccessType.BLOCK, fs_type=None))
    finally:
        s.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT fs_type FROM volumes WHERE name = 'pvc-3'").fetchone() == ("",)
    db.close()


def test_volume_names_are_unique_and_failed_insert_rolls_back(store: Store) -> None:
    store.add_volume(vol(1, name="same"))
    with pytest.raises(StowageError):
        store.add_volume(vol(2, name="same"))
    assert store.get_volume(vol(2).id) is None
    assert store.counts() == (1, 0)
    store.add_volume(vol(3))  # the store still works after the failed transaction
    assert store.counts() == (2, 0)


def test_snapshot_names_are_unique(store: Store) -> None:
    store.add_snapshot(snap(1, vol(1).id, "n"))
    with pytest.raises(StowageError):
        store.add_snapshot(snap(2, vol(1).id, "n"))
    assert [s.id for s in store.list_snapshots()] == [snap(1, "").id]


def test_snapshot_round_trip_and_filter(store: Store) -> None:
    a, b = vol(1).id, vol(2).id
    for i, src in enumerate([a, b, a, b, a], start=1):
        store.add_snapshot(snap(i, src))
    assert store.get_snapshot(snap(3, a).id) == snap(3, a)
    assert store.snapshot_by_name("snap-3") == snap(3, a)
    assert [s.id for s in store.list_snapshots(source_volume_id=a)] == [
        snap(i, a).id for i in (1, 3, 5)
    ]
    assert [
        s.id for s in store.list_snapshots(after=snap(1, a).id, limit=2, source_volume_id=a)
    ] == [snap(3, a).id, snap(5, a).id]
    store.remove_snapshot(snap(3, a).id)
    assert store.get_snapshot(snap(3, a).id) is None


def test_list_volumes_paginates_in_id_order(store: Store) -> None:
    for n in (5, 3, 9, 1, 7):
        store.add_volume(vol(n))
    assert [v.id for v in store.list_volumes()] == [vol(n).id for n in (1, 3, 5, 7, 9)]
    assert [v.id for v in store.list_volumes(limit=2)] == [vol(1).id, vol(3).id]
    assert [v.id for v in store.list_volumes(after=vol(3).id, limit=2)] == [vol(5).id, vol(7).id]
    assert [v.id for v in store.list_volumes(after=vol(9).id)] == []


def test_journal_begin_end(store: Store) -> None:
    a = store.journal_begin("create-volume", "v-x", {"name": "n", "z": 1})
    b = store.journal_begin("expand-volume", "v-y", {"size": 5})
    assert b > a
    assert store.journal() == [
        (a, "create-volume", "v-x", {"name": "n", "z": 1}),
        (b, "expand-volume", "v-y", {"size": 5}),
    ]
    store.journal_end(a)
    assert store.journal() == [(b, "expand-volume", "v-y", {"size": 5})]
    store.journal_end(b)
    store.journal_end(b)
    assert store.journal() == []


def test_stagings_and_publications(store: Store) -> None:
    s = Staging(
        "v-" + "1" * 32,
        "/k/staging",
        "/dev/loop3",
        AccessType.MOUNT,
        "xfs",
        True,
        ("noatime", "discard"),
    )
    store.put_staging(s)
    assert store.staging(s.volume_id) == s
    assert store.stagings() == [s]
    p1 = Publication(s.volume_id, "/k/t1", True, AccessMode.SINGLE_NODE_MULTI_WRITER)
    p2 = Publication(s.volume_id, "/k/t0", False, AccessMode.SINGLE_NODE_WRITER)
    store.put_publication(p1)
    store.put_publication(p2)
    assert store.publications(s.volume_id) == [p2, p1]  # ordered by target
    assert store.publications() == [p2, p1]
    assert store.publications("v-" + "2" * 32) == []
    assert store.publication("/k/t1") == p1
    store.remove_publication("/k/t1")
    assert store.publication("/k/t1") is None
    store.remove_staging(s.volume_id)
    assert store.staging(s.volume_id) is None and store.stagings() == []


def test_in_use_is_what_a_delete_must_find_false(store: Store) -> None:
    vid, other = "v-" + "7" * 32, "v-" + "8" * 32
    assert not store.in_use(vid)
    store.put_publication(Publication(vid, "/k/t", False, AccessMode.SINGLE_NODE_WRITER))
    assert store.in_use(vid) and not store.in_use(other)
    store.remove_publication("/k/t")
    store.put_staging(Staging(vid, "/k/s", "/dev/loop1", AccessType.BLOCK, "", False, ()))
    assert store.in_use(vid) and not store.in_use(other)
    store.remove_staging(vid)
    assert not store.in_use(vid)


# --- KeyedLocks -----------------------------------------------------------------------------------
def test_second_holder_is_aborted() -> None:
    locks = KeyedLocks()
    with locks.hold("v-1"):
        assert busy(locks, "v-1")
        with pytest.raises(Aborted), locks.hold("v-1"):
            pass
        with locks.hold("v-2"):  # other keys are independent
            assert busy(locks, "v-2")
    assert not busy(locks, "v-1") and not busy(locks, "v-2")


def test_keys_released_after_exception() -> None:
    locks = KeyedLocks()
    with pytest.raises(RuntimeError), locks.hold("a", "b"):
        raise RuntimeError("boom")
    assert not busy(locks, "a") and not busy(locks, "b")
    with locks.hold("a", "b"):
        pass


def test_multi_key_is_all_or_nothing() -> None:
    locks = KeyedLocks()
    with locks.hold("b"):
        with pytest.raises(Aborted), locks.hold("a", "b", "c"):
            pass
        assert not busy(locks, "a") and not busy(locks, "c")
    with locks.hold("a", "a", ""):  # duplicates and empty keys are harmless
        assert busy(locks, "a") and not busy(locks, "")
    assert not busy(locks, "a")


def test_concurrent_holders_exactly_one_wins() -> None:
    locks = KeyedLocks()
    barrier = threading.Barrier(8)
    release = threading.Event()
    outcomes: list[str] = []
    guard = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            with locks.hold("v"):
                with guard:
                    outcomes.append("won")
                release.wait(5)
        except Aborted:
            with guard:
                outcomes.append("aborted")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with guard:
            if outcomes.count("aborted") == 7:
                break
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(5)
    assert sorted(outcomes) == ["aborted"] * 7 + ["won"]
