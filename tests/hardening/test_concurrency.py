"""Concurrency storms (issue 7, part 5).

Conflicting calls: the first call of a round is held inside its critical section by a `sleep`
fault point, 63 conflicting calls arrive meanwhile, and exactly one proceeds while all the others
get ABORTED. Random storm: 1,000 operations from 16 clients on a handful of names and volumes;
every answer is one the spec allows, and the end state is exactly what the answers said.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from driver.ctl.client import Client, block_cap, mount_cap
from tests.hardening.world import World, running_world
from tests.integration.helpers import MiB

HOLD = 3.0  # seconds the first call of a round sits inside its lock
ROUND_FAULTS = ",".join(
    f"{p}=sleep:{HOLD}"
    for p in (
        "create-volume:checked",
        "stage:loop-attached",
        "publish:bound",
        "node-expand:journaled",
        "create-snapshot:checked",
        "delete-volume:checked",
    )
)


@pytest.fixture
def world() -> Iterator[World]:
    with running_world("--workers", "64") as w:
        yield w


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def storm(first: Callable[[], object], others: list[Callable[[], object]]) -> Counter[str]:
    """Start `first`, wait until it holds its lock, fire `others` together; count the codes."""
    with ThreadPoolExecutor(max_workers=len(others) + 1) as pool:
        lead = pool.submit(code_of, first)
        time.sleep(HOLD / 3)
        gate = threading.Barrier(len(others))

        def go(call: Callable[[], object]) -> grpc.StatusCode:
            gate.wait()
            return code_of(call)

        rest = [pool.submit(go, c) for c in others]
        codes = Counter(f.result().name for f in rest)
        assert lead.result() == grpc.StatusCode.OK
    return codes


def test_64_conflicting_calls_exactly_one_proceeds(world: World) -> None:
    world.restart(faults=ROUND_FAULTS)
    c = world.client
    staging = os.path.join(world.pool.base, "staging")
    target = os.path.join(world.pool.base, "target")
    os.makedirs(staging)
    cap = mount_cap("xfs")  # grows online without CAP_SYS_RESOURCE (ext4 needs it)
    made: list[str] = []

    def create() -> None:
        made.append(c.create_volume("contested", 320 * MiB, cap).volume_id)

    # Round 1: 64 CreateVolume with one name.
    codes = storm(create, [create] * 63)
    assert codes == {"ABORTED": 63}, codes
    assert len(set(made)) == 1 and [e.volume.volume_id for e in c.list_volumes()] == made[:1]
    vid = made[0]

    def on_volume() -> list[Callable[[], object]]:
        """63 calls that all need the volume's lock."""
        kinds: list[Callable[[], object]] = [
            lambda: c.stage(vid, staging, cap),
            lambda: c.publish(vid, staging, target, cap),
            lambda: c.node_expand(vid, target, 448 * MiB),
            lambda: c.create_snapshot(f"s-{random.random()}", vid),
            lambda: c.delete_volume(vid),
            lambda: c.unpublish(vid, target),
            lambda: c.unstage(vid, staging),
        ]
        return [kinds[i % len(kinds)] for i in range(63)]

    # Rounds 2-6: one call of each kind holds the volume; everything else on it is ABORTED.
    rounds: list[Callable[[], object]] = [
        lambda: c.stage(vid, staging, cap),
        lambda: c.publish(vid, staging, target, cap),
        lambda: c.node_expand(vid, target, 384 * MiB),  # published by the round before
        lambda: c.create_snapshot("held", vid),
    ]
    for first in rounds:
        codes = storm(first, on_volume())
        assert codes == {"ABORTED": 63}, codes
    assert len(c.list_snapshots()) == 1  # only the held round's snapshot was made
    c.unpublish(vid, target)
    c.unstage(vid, staging)
    codes = storm(lambda: c.delete_volume(vid), on_volume())
    assert codes == {"ABORTED": 63}, codes
    assert c.list_volumes() == []
    assert world.check().ok


def test_1000_random_operations_from_16_clients_end_consistent(world: World) -> None:
    names = [f"n{i}" for i in range(6)]
    snap_names = [f"s{i}" for i in range(6)]
    lock = threading.Lock()
    created: set[str] = set()
    deleted: set[str] = set()
    snaps_created: set[str] = set()
    snaps_deleted: set[str] = set()
    codes: Counter[str] = Counter()
    kinds: dict[str, bool] = {}  # volume or snapshot ID -> block access
    allowed = {
        "OK",
        "ABORTED",  # another call holds the volume or the name
        "FAILED_PRECONDITION",  # delete while staged, unstage while published, ...
        "NOT_FOUND",  # the volume was deleted by another client
        "ALREADY_EXISTS",  # a snapshot name taken for another volume
    }
    rng = random.Random(7)
    base = world.pool.base

    def paths(vid: str) -> tuple[str, str]:
        staging = os.path.join(base, f"s-{vid}")
        os.makedirs(staging, exist_ok=True)
        return staging, os.path.join(base, f"t-{vid}")

    def one(client: Client, r: random.Random) -> None:
        with lock:
            known = sorted(created - deleted)
            snaps = sorted(snaps_created - snaps_deleted)
            vid = r.choice(known) if known else ""
            block = kinds.get(vid, False)
            sid = r.choice(snaps) if snaps else ""
            snap_block = kinds.get(sid, False)
        cap = block_cap() if block else mount_cap("ext4")
        op = r.choice(
            ["create"] * 3
            + ["delete", "snapshot", "delsnap", "restore", "expand"]
            + ["stage", "publish", "unpublish", "unstage"] * 2
        )
        result: object = None

        def call() -> None:
            nonlocal result
            if op == "create":
                name = r.choice(names)
                is_block = name in ("n0", "n1")
                capv = block_cap() if is_block else mount_cap("ext4")
                result = client.create_volume(name, 64 * MiB, capv).volume_id
                with lock:
                    kinds[str(result)] = is_block
            elif not vid:
                return
            elif op == "delete":
                client.delete_volume(vid)
            elif op == "snapshot":
                result = client.create_snapshot(r.choice(snap_names), vid).snapshot_id
                with lock:
                    kinds[str(result)] = block
            elif op == "delsnap" and sid:
                client.delete_snapshot(sid)
                result = sid
            elif op == "restore" and sid:
                name = f"r{r.randrange(4)}" + ("b" if snap_block else "m")
                scap = block_cap() if snap_block else mount_cap("ext4")
                result = client.create_volume(name, 64 * MiB, scap, snapshot=sid).volume_id
                with lock:
                    kinds[str(result)] = snap_block
            elif op == "expand":  # as csi-resizer, then the kubelet on a published volume
                size = client.expand_volume(vid, r.choice([64, 96, 128]) * MiB)
                client.node_expand(vid, paths(vid)[1], size)
            elif op == "stage":
                client.stage(vid, paths(vid)[0], cap)
            elif op == "publish":
                s, t = paths(vid)
                client.publish(vid, s, t, cap)
            elif op == "unpublish":
                client.unpublish(vid, paths(vid)[1])
            elif op == "unstage":
                client.unstage(vid, paths(vid)[0])

        code = code_of(call).name
        with lock:
            codes[f"{op}:{code}"] += 1
            if code == "OK":
                if op in ("create", "restore") and result:
                    created.add(str(result))
                elif op == "delete":
                    deleted.add(vid)
                elif op == "snapshot" and result:
                    snaps_created.add(str(result))
                elif op == "delsnap" and result:
                    snaps_deleted.add(str(result))
        if code not in allowed:
            raise AssertionError(f"{op} on {vid or '-'} answered {code}")

    def client_loop(seed: int) -> None:
        r = random.Random(seed)
        client = Client(world.driver.endpoint, timeout=120)
        try:
            for _ in range(1000 // 16 + 1):
                one(client, r)
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        for f in [pool.submit(client_loop, rng.randrange(1 << 30)) for _ in range(16)]:
            f.result()
    total = sum(codes.values())
    print(f"{total} operations: {dict(sorted(codes.items()))}")
    assert total >= 1000
    assert sum(n for k, n in codes.items() if k.endswith(":ABORTED")) > 0  # conflicts happened
    assert world.check().ok, world.check().problems

    # The end state is what the answers said: created minus deleted, for volumes and snapshots.
    c = world.client
    assert {e.volume.volume_id for e in c.list_volumes()} == created - deleted
    assert {e.snapshot.snapshot_id for e in c.list_snapshots()} == snaps_created - snaps_deleted
    # Take everything down through the driver; the pool must end empty and consistent.
    for vid in sorted(created - deleted):
        s, t = paths(vid)
        c.unpublish(vid, t)
        c.unstage(vid, s)
        c.delete_volume(vid)
    for sid in sorted(snaps_created - snaps_deleted):
        c.delete_snapshot(sid)
    assert c.list_volumes() == [] and c.list_snapshots() == []
    assert world.check().ok
