"""Hostile input corpus: every RPC that takes an ID, a name, a capacity, a capability, mount
flags, a path or secrets, fed what a malicious PV/PVC/StorageClass author (or a confused CO)
could send, over gRPC against a real driver on a real pool.

Every case asserts the exact gRPC code and that nothing changed: the files under the pool (with
sizes; meta.db compared by its rows, not its bytes), the mounts under this test's directory, the
loop devices backed by files under it, and the files, modes and owners of the directories that
stand in for kubelet's and for "outside" (a directory a symlink points at). Every request carries a
canary secret in each `secrets` map; no log line may contain it.

One driver (debug level, JSON logs) on one pool serves the whole module; the fixture tears down
mounts, loop devices and the directory even when a case fails. A second, short-lived driver with
text logs replays a happy path with secrets.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from csi_proto import csi_pb2
from driver.ctl.client import Client, block_cap, mount_cap
from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from harness import DriverProcess, Pool, make_pool

pytestmark = pytest.mark.root

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
ABORTED = grpc.StatusCode.ABORTED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

MiB = 1 << 20
GiB = 1 << 30
INT64_MAX = 2**63 - 1
Mode = csi_pb2.VolumeCapability.AccessMode

CANARY = "canary-" + uuid.uuid4().hex
SECRETS = {"password": CANARY, "token": "tok-" + CANARY}
MASK = "***stripped***"
NODE_ID = "hostile-node"
_DB_FILES = {"meta.db", "meta.db-wal", "meta.db-shm"}

# --- the world the cases run against ------------------------------------------------------------


@dataclass
class World:
    pool: Pool
    driver: DriverProcess
    client: Client
    # `--mode controller`, as the chart's controller Deployment runs it: every
    # ControllerExpandVolume case is sent to it too and must get the same answer.
    controller_driver: DriverProcess
    controller: Client
    work: str  # stands in for kubelet's directory
    outside: str  # what a symlink escape would reach
    link: str  # work/link -> outside
    foreign: str  # work/foreign: a tmpfs the driver did not mount
    vol: str = ""  # ext4, staged at `staging`, published at `target`
    staging: str = ""
    target: str = ""
    idle: str = ""  # ext4 volume, never staged (unformatted)
    block: str = ""  # block volume, never staged
    snap: str = ""  # snapshot of `vol`
    log_offset: int = 0
    controller_cases: int = 0  # cases also sent to controller mode
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def fresh(self, tag: str) -> str:
        return os.path.join(self.work, f"{tag}-{uuid.uuid4().hex[:8]}")


def _run(argv: list[str]) -> None:
    SubprocessRunner().run(argv)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    assert os.geteuid() == 0, "the hostile suite needs root (loop devices, mkfs, mount)"
    pool, teardown = make_pool(size=64 << 30)
    driver = DriverProcess(pool, "--log-level", "debug", "--log-format", "json", node_id=NODE_ID)
    controller_driver = DriverProcess(
        pool, "--log-level", "debug", "--log-format", "json",
        node_id="hostile-controller", name="controller", mode="controller",
    )  # fmt: skip
    client: Client | None = None
    controller: Client | None = None
    try:
        client = driver.start()
        controller = controller_driver.start()
        work = os.path.join(pool.base, "work")
        outside = os.path.join(pool.base, "outside")
        os.makedirs(os.path.join(outside, "sub"))
        os.makedirs(work)
        with open(os.path.join(outside, "data"), "w") as fh:
            fh.write("outside data that must survive\n")
        with open(os.path.join(outside, "empty"), "w"):
            pass
        link = os.path.join(work, "link")
        os.symlink(outside, link)
        foreign = os.path.join(work, "foreign")
        os.makedirs(foreign)
        _run(["mount", "-t", "tmpfs", "-o", "size=1m", "hostile-tmpfs", foreign])
        w = World(pool, driver, client, controller_driver, controller, work, outside, link, foreign)
        w.vol = client.create_volume("hostile-vol", 64 * MiB, mount_cap("ext4")).volume_id
        w.staging = os.path.join(work, "staging")
        w.target = os.path.join(work, "target")
        os.makedirs(w.staging)
        client.stage(w.vol, w.staging, mount_cap("ext4"))
        client.publish(w.vol, w.staging, w.target, mount_cap("ext4"))
        with open(os.path.join(w.target, "payload"), "w") as fh:
            fh.write("volume data\n")
        w.idle = client.create_volume("hostile-idle", 64 * MiB, mount_cap("ext4")).volume_id
        w.block = client.create_volume("hostile-block", 16 * MiB, block_cap()).volume_id
        w.snap = client.create_snapshot("hostile-snap", w.vol).snapshot_id
        w.log_offset = len(driver.log().encode())
        yield w
        # Summary for the report: how many cases ran in each category.
        print("\nhostile cases by category:", dict(sorted(w.counts.items())))
        print("hostile cases total:", sum(w.counts.values()))
        print("of which also sent to controller mode:", w.controller_cases)
    finally:
        for c in (client, controller):
            if c is not None:
                c.close()
        driver.stop()
        controller_driver.stop()
        teardown()


# --- state snapshot -------------------------------------------------------------------------------


def _tree(root: str, skip: Callable[[str], bool] = lambda _: False) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if skip(rel):
                continue
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = st.st_size
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)
    return out


def _digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _meta_rows(db: str) -> dict[str, list[str]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        return {t: sorted(repr(r) for r in con.execute(f'SELECT * FROM "{t}"')) for t in tables}
    finally:
        con.close()


def snapshot(w: World) -> dict[str, Any]:
    base = w.pool.base
    mounts = sorted(
        (e.mount_point, e.source, e.fs_type, tuple(sorted(e.options)), e.root)
        for e in mountinfo.read()
        if e.mount_point.startswith(base + os.sep) or e.source.startswith(base + os.sep)
    )
    loops = sorted(
        (lo.device, lo.backing_file)
        for lo in LoopManager(SubprocessRunner()).devices()
        if lo.backing_file.startswith(base + os.sep)
    )
    return {
        "pool files": _tree(w.pool.mount, lambda rel: rel in _DB_FILES),
        "meta.db": _meta_rows(os.path.join(w.pool.mount, "meta.db")),
        "mounts": mounts,
        "loops": loops,
        "work": _tree(w.work),
        "outside": _tree(w.outside),
        "outside bytes": _digest(w.outside),
    }


def _without_trash(snap: dict[str, Any]) -> dict[str, Any]:
    out = dict(snap)
    out["pool files"] = {
        k: v for k, v in snap["pool files"].items() if k != "trash" and not k.startswith("trash/")
    }
    out["meta.db"] = {k: v for k, v in snap["meta.db"].items() if k != "sqlite_sequence"}
    return out


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = []
    for key, b in before.items():
        a = after[key]
        if b != a:
            if isinstance(b, dict):
                for k in sorted(set(b) | set(a)):
                    if b.get(k) != a.get(k):
                        lines.append(f"{key}: {k}: {b.get(k)!r} -> {a.get(k)!r}")
            else:
                lines.append(f"{key}: {b!r} -> {a!r}")
    return "\n".join(lines)


# --- calling the driver ---------------------------------------------------------------------------


def _with_secrets(req: Message) -> bool:
    if "secrets" not in req.DESCRIPTOR.fields_by_name:
        return False
    req.secrets.update(SECRETS)  # type: ignore[attr-defined]
    return True


def call(w: World, rpc: str, req: Message) -> tuple[grpc.StatusCode, Any, str]:
    stub = w.client.node if rpc.startswith("Node") else w.client.controller
    try:
        resp = getattr(stub, rpc)(req, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), None, exc.details() or ""
    return OK, resp, ""


def new_log(w: World) -> str:
    with open(w.driver.log_path, "rb") as fh:
        fh.seek(w.log_offset)
        data = fh.read()
    w.log_offset += len(data)
    return data.decode("utf-8", errors="replace")


# --- the table ------------------------------------------------------------------------------------

Build = Callable[[World], Message]
Check = Callable[[World, Any], None]


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    rpc: str
    build: Build
    code: grpc.StatusCode
    # For accepted calls that create something: look at the result, then undo it. The state
    # after the undo must equal the state before, except for images moved into the pool's trash.
    verify: Check | None = None
    churn: bool = False

    @property
    def id(self) -> str:
        return f"{self.category}:{self.rpc}:{self.name}"


CASES: list[Case] = []


def case(
    category: str,
    name: str,
    rpc: str,
    build: Build,
    code: grpc.StatusCode,
    verify: Check | None = None,
    churn: bool = False,
) -> None:
    CASES.append(Case(category, name, rpc, build, code, verify, churn))


def mcap(
    fs: str = "",
    mode: int = Mode.SINGLE_NODE_WRITER,
    flags: list[str] | None = None,
    group: str = "",
) -> csi_pb2.VolumeCapability:
    cap = mount_cap(fs, mode)
    cap.mount.mount_flags.extend(flags or [])
    cap.mount.volume_mount_group = group
    return cap


def bcap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return block_cap(mode)


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_req(
    name: str | None = None,
    caps: list[csi_pb2.VolumeCapability] | None = None,
    required: int = 64 * MiB,
    limit: int = 0,
    params: dict[str, str] | None = None,
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=uniq("pvc") if name is None else name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=[mcap()] if caps is None else caps,
        parameters=params or {},
    )


# --- verifiers / undo for accepted calls ---------------------------------------------------------


def _db(w: World) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{os.path.join(w.pool.mount, 'meta.db')}?mode=ro", uri=True)


def created_volume(expected_name: str | None = None) -> Check:
    """The new volume's image is volumes/<ours>.img, its row keeps the name verbatim; delete it."""

    def check(w: World, resp: csi_pb2.CreateVolumeResponse) -> None:
        vid = resp.volume.volume_id
        assert (
            vid.startswith("v-")
            and len(vid) == 34
            and all(c in "0123456789abcdef" for c in vid[2:])
        ), vid
        assert os.path.isfile(os.path.join(w.pool.mount, "volumes", vid + ".img"))
        con = _db(w)
        try:
            (name,) = con.execute("SELECT name FROM volumes WHERE id = ?", (vid,)).fetchone()
        finally:
            con.close()
        if expected_name is not None:
            assert name == expected_name
        w.client.delete_volume(vid)

    return check


def created_snapshot(expected_name: str) -> Check:
    def check(w: World, resp: csi_pb2.CreateSnapshotResponse) -> None:
        sid = resp.snapshot.snapshot_id
        assert sid.startswith("s-") and len(sid) == 34, sid
        assert resp.snapshot.source_volume_id == w.vol
        assert os.path.isfile(os.path.join(w.pool.mount, "snapshots", sid + ".img"))
        con = _db(w)
        try:
            (name,) = con.execute("SELECT name FROM snapshots WHERE id = ?", (sid,)).fetchone()
        finally:
            con.close()
        assert name == expected_name
        w.client.delete_snapshot(sid)

    return check


def empty_list(w: World, resp: csi_pb2.ListSnapshotsResponse) -> None:
    assert list(resp.entries) == []


def not_confirmed(w: World, resp: csi_pb2.ValidateVolumeCapabilitiesResponse) -> None:
    assert not resp.HasField("confirmed") and resp.message


def zero_capacity(w: World, resp: csi_pb2.GetCapacityResponse) -> None:
    assert resp.available_capacity == 0


# --- 1. IDs ---------------------------------------------------------------------------------------

HEX = "0123456789abcdef" * 2


def bad_volume_ids(w: World) -> dict[str, str]:
    return {
        "dotdot-etc": "../../etc",
        "abs-passwd": "/etc/passwd",
        "vol-dotdot": "vol-../x",
        "v-dotdot": "v-../../../../etc/passwd",
        "real-then-dotdot": f"{w.vol}/../../../outside",
        "dotdot-real": f"../volumes/{w.vol}",
        "real-img": f"{w.vol}.img",
        "real-slash": f"{w.vol}/",
        "real-nul": f"{w.vol}\x00../x",
        "nul-only": "\x00",
        "pct-2e": "%2e%2e%2f%2e%2e%2fetc",
        "upper": w.vol.upper(),
        "space": f" {w.vol}",
        "newline": f"{w.vol}\n",
        "snapshot-id": w.snap,
        "dot": ".",
        "long-4k": "v-" + "a" * 4096,
        "long-64k": "../" * 20000,
        "unicode": "v-ⅰⅱⅲ" + HEX[:29],
    }


def bad_snapshot_ids(w: World) -> dict[str, str]:
    return {
        "dotdot-etc": "../../etc",
        "abs-passwd": "/etc/passwd",
        "s-dotdot": "s-../../x",
        "dotdot-real": f"../snapshots/{w.snap}",
        "real-img": f"{w.snap}.img",
        "real-nul": f"{w.snap}\x00",
        "pct-2e": "%2e%2e%2f",
        "upper": w.snap.upper(),
        "volume-id": w.vol,
        "long-4k": "s-" + "b" * 4096,
        # Backup snapshot IDs (b-<target>-<32 hex>) that are not well formed.
        "b-dotdot": f"b-../../x-{HEX}",
        "b-slash": f"b-a/b-{HEX}",
        "b-upper-target": f"b-MAIN-{HEX}",
        "b-dash-end": f"b-main--{HEX}",
        "b-nul": f"b-main-{HEX}\x00",
        "b-newline": f"b-main-{HEX}\n",
        "b-short": f"b-main-{HEX[:31]}",
        "b-long-target": f"b-{'a' * 64}-{HEX}",
        "b-img": f"b-main-{HEX}.img",
        "b-no-target": f"b-{HEX}",
    }


def _bad_vid(key: str) -> Callable[[World], str]:
    return lambda w: bad_volume_ids(w)[key]


def _bad_sid(key: str) -> Callable[[World], str]:
    return lambda w: bad_snapshot_ids(w)[key]


def _id_cases() -> None:
    # Volume ID keys are known statically: build the dict once with a dummy world-free sample.
    keys = [
        "dotdot-etc",
        "abs-passwd",
        "vol-dotdot",
        "v-dotdot",
        "real-then-dotdot",
        "dotdot-real",
        "real-img",
        "real-slash",
        "real-nul",
        "nul-only",
        "pct-2e",
        "upper",
        "space",
        "newline",
        "snapshot-id",
        "dot",
        "long-4k",
        "long-64k",
        "unicode",
    ]
    for key in keys:
        vid = _bad_vid(key)
        cat = "volume-id"
        case(
            cat,
            key,
            "DeleteVolume",
            lambda w, v=vid: csi_pb2.DeleteVolumeRequest(volume_id=v(w)),
            OK,
        )
        case(
            cat,
            key,
            "ValidateVolumeCapabilities",
            lambda w, v=vid: csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=v(w), volume_capabilities=[mcap()]
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "ControllerExpandVolume",
            lambda w, v=vid: csi_pb2.ControllerExpandVolumeRequest(
                volume_id=v(w), capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "ControllerGetVolume",
            lambda w, v=vid: csi_pb2.ControllerGetVolumeRequest(volume_id=v(w)),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "CreateSnapshot",
            lambda w, v=vid: csi_pb2.CreateSnapshotRequest(
                name=uniq("snap"), source_volume_id=v(w)
            ),
            NOT_FOUND,
        )

        def clone_req(w: World, v: Callable[[World], str] = vid) -> Message:
            req = create_req()
            req.volume_content_source.volume.volume_id = v(w)
            return req

        case(cat, key, "CreateVolume", clone_req, NOT_FOUND)
        case(
            cat,
            key,
            "ListSnapshots",
            lambda w, v=vid: csi_pb2.ListSnapshotsRequest(source_volume_id=v(w)),
            OK,
            verify=empty_list,
        )
        case(
            cat,
            key,
            "NodeStageVolume",
            lambda w, v=vid: csi_pb2.NodeStageVolumeRequest(
                volume_id=v(w), staging_target_path=w.fresh("stage"), volume_capability=mcap()
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "NodeUnstageVolume",
            lambda w, v=vid: csi_pb2.NodeUnstageVolumeRequest(
                volume_id=v(w), staging_target_path=w.staging
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "NodePublishVolume",
            lambda w, v=vid: csi_pb2.NodePublishVolumeRequest(
                volume_id=v(w),
                staging_target_path=w.staging,
                target_path=w.fresh("pub"),
                volume_capability=mcap(),
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "NodeUnpublishVolume",
            lambda w, v=vid: csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=v(w), target_path=w.target
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "NodeGetVolumeStats",
            lambda w, v=vid: csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=v(w), volume_path=w.target
            ),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "NodeExpandVolume",
            lambda w, v=vid: csi_pb2.NodeExpandVolumeRequest(
                volume_id=v(w),
                volume_path=w.target,
                capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
            ),
            NOT_FOUND,
        )

    skeys = [
        "dotdot-etc",
        "abs-passwd",
        "s-dotdot",
        "dotdot-real",
        "real-img",
        "real-nul",
        "pct-2e",
        "upper",
        "volume-id",
        "long-4k",
        "b-dotdot",
        "b-slash",
        "b-upper-target",
        "b-dash-end",
        "b-nul",
        "b-newline",
        "b-short",
        "b-long-target",
        "b-img",
        "b-no-target",
    ]
    for key in skeys:
        sid = _bad_sid(key)
        cat = "snapshot-id"
        case(
            cat,
            key,
            "DeleteSnapshot",
            lambda w, s=sid: csi_pb2.DeleteSnapshotRequest(snapshot_id=s(w)),
            OK,
        )
        case(
            cat,
            key,
            "GetSnapshot",
            lambda w, s=sid: csi_pb2.GetSnapshotRequest(snapshot_id=s(w)),
            NOT_FOUND,
        )
        case(
            cat,
            key,
            "ListSnapshots",
            lambda w, s=sid: csi_pb2.ListSnapshotsRequest(snapshot_id=s(w)),
            OK,
            verify=empty_list,
        )

        def restore_req(w: World, s: Callable[[World], str] = sid) -> Message:
            req = create_req()
            req.volume_content_source.snapshot.snapshot_id = s(w)
            return req

        case(cat, key, "CreateVolume", restore_req, NOT_FOUND)

    # Well-formed IDs that are not ours: the ordinary not-found answers.
    unknown_v, unknown_s = "v-" + "0" * 32, "s-" + "0" * 32
    case(
        "volume-id",
        "unknown-wellformed",
        "DeleteVolume",
        lambda w: csi_pb2.DeleteVolumeRequest(volume_id=unknown_v),
        OK,
    )
    case(
        "volume-id",
        "unknown-wellformed",
        "ControllerGetVolume",
        lambda w: csi_pb2.ControllerGetVolumeRequest(volume_id=unknown_v),
        NOT_FOUND,
    )
    case(
        "volume-id",
        "unknown-wellformed",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=unknown_v, staging_target_path=w.fresh("stage"), volume_capability=mcap()
        ),
        NOT_FOUND,
    )
    case(
        "snapshot-id",
        "unknown-wellformed",
        "DeleteSnapshot",
        lambda w: csi_pb2.DeleteSnapshotRequest(snapshot_id=unknown_s),
        OK,
    )
    case(
        "snapshot-id",
        "unknown-wellformed",
        "GetSnapshot",
        lambda w: csi_pb2.GetSnapshotRequest(snapshot_id=unknown_s),
        NOT_FOUND,
    )
    unknown_b = "b-main-" + "0" * 32  # no backup target is configured in this world
    case(
        "snapshot-id",
        "unknown-backup",
        "DeleteSnapshot",
        lambda w: csi_pb2.DeleteSnapshotRequest(snapshot_id=unknown_b),
        OK,
    )
    case(
        "snapshot-id",
        "unknown-backup",
        "GetSnapshot",
        lambda w: csi_pb2.GetSnapshotRequest(snapshot_id=unknown_b),
        NOT_FOUND,
    )
    # Required IDs that are missing are INVALID_ARGUMENT, never NOT_FOUND or OK.
    for rpc, req in (
        ("DeleteVolume", csi_pb2.DeleteVolumeRequest()),
        ("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest()),
        ("GetSnapshot", csi_pb2.GetSnapshotRequest()),
        ("ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest()),
        ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="no-source")),
    ):
        case("volume-id", "missing", rpc, lambda w, r=req: _copy(r), INVALID)
    # Pagination tokens are ours too.
    for token in ("../x", "/etc/passwd", "v-" + "f" * 32 + "/.."):
        case(
            "volume-id",
            f"token-{token[:6]}",
            "ListVolumes",
            lambda w, t=token: csi_pb2.ListVolumesRequest(starting_token=t),
            ABORTED,
        )
        case(
            "snapshot-id",
            f"token-{token[:6]}",
            "ListSnapshots",
            lambda w, t=token: csi_pb2.ListSnapshotsRequest(starting_token=t),
            ABORTED,
        )
    case(
        "volume-id",
        "negative-max-entries",
        "ListVolumes",
        lambda w: csi_pb2.ListVolumesRequest(max_entries=-1),
        INVALID,
    )


def _copy(req: Message) -> Message:
    out = type(req)()
    out.CopyFrom(req)
    return out


# --- 1b. RPCs Stowage does not serve -----------------------------------------------------------


def _removed_rpc_cases() -> None:
    """No attach: ControllerPublish/Unpublish are UNIMPLEMENTED (and not advertised) whatever
    they carry."""
    c = "not-served"
    ids: tuple[tuple[str, Callable[[World], str]], ...] = (
        ("valid", lambda w: w.idle),
        ("dotdot", lambda w: "../../etc"),
        ("empty", lambda w: ""),
    )
    for key, vid in ids:
        case(
            c,
            key,
            "ControllerPublishVolume",
            lambda w, v=vid: csi_pb2.ControllerPublishVolumeRequest(
                volume_id=v(w), node_id=NODE_ID, volume_capability=mcap()
            ),
            UNIMPLEMENTED,
        )
        case(
            c,
            key,
            "ControllerUnpublishVolume",
            lambda w, v=vid: csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=v(w), node_id="../../etc"
            ),
            UNIMPLEMENTED,
        )


# --- 1c. mutable parameters (ModifyVolume, issue 18) -------------------------------------------

RIOPS = "stowage.csi.io/read-iops"
WBPS = "stowage.csi.io/write-bps"
BAD_MUTABLE: dict[str, dict[str, str]] = {
    "zero": {RIOPS: "0"},
    "negative": {RIOPS: "-100"},
    "not-a-number": {RIOPS: "fast"},
    "fraction": {RIOPS: "1.5"},
    "exponent": {RIOPS: "1e3"},
    "empty-value": {RIOPS: ""},
    "padded": {RIOPS: " 100"},
    "absurd-iops": {RIOPS: "10000001"},
    "huge-number": {RIOPS: "9" * 40},
    "absurd-bps": {WBPS: "2Ti"},
    "tiny-bps": {WBPS: "100"},
    "bps-millis": {WBPS: "50m"},
    "unknown-key": {"XXX_FakeKey": "XXX_FakeValue"},
    "immutable-fstype": {"fsType": "xfs"},
    "immutable-preallocate": {"preallocate": "true"},
    "good-and-bad": {RIOPS: "100", WBPS: "-1"},
    "huge-map": {RIOPS: "1" * 5000},
}


def _mutable_cases() -> None:
    """ControllerModifyVolume and CreateVolume's mutable_parameters: every refusal is exact and
    changes nothing (the volume's row and record keep their parameters)."""
    c = "mutable"
    for key, params in BAD_MUTABLE.items():
        case(
            c,
            key,
            "ControllerModifyVolume",
            lambda w, p=params: csi_pb2.ControllerModifyVolumeRequest(
                volume_id=w.idle, mutable_parameters=p
            ),
            INVALID,
        )
    for key, params in (("zero", BAD_MUTABLE["zero"]), ("unknown", BAD_MUTABLE["unknown-key"])):
        case(
            c,
            key,
            "CreateVolume",
            lambda w, p=params: _with_mutable(create_req(), p),
            INVALID,
        )
    good = {RIOPS: "1000"}
    for key, vid, code in (
        ("dotdot", lambda w: "../../etc", NOT_FOUND),
        ("empty-id", lambda w: "", INVALID),
        ("unknown-volume", lambda w: "v-" + "0" * 32, NOT_FOUND),
        ("snapshot-id", lambda w: w.snap, NOT_FOUND),
    ):
        case(
            c,
            key,
            "ControllerModifyVolume",
            lambda w, v=vid: csi_pb2.ControllerModifyVolumeRequest(
                volume_id=v(w), mutable_parameters=good
            ),
            code,
        )


def _with_mutable(
    req: csi_pb2.CreateVolumeRequest, mutable: dict[str, str]
) -> csi_pb2.CreateVolumeRequest:
    req.mutable_parameters.update(mutable)
    return req


# --- 2. names -------------------------------------------------------------------------------------

ACCEPTED_NAMES = {
    "ascii-128": "n" * 128,
    "utf8-128": "é" * 64,  # 2 bytes each
    "utf8-mixed-128": "ボ" * 42 + "ab",  # 3 bytes each
    "japanese": "ボリューム-データ",
    "dotdot-etc-passwd": "../../etc/passwd",
    "slash": "/",
    "dotdot": "..",
    "dot": ".",
    "abs": "/etc/shadow",
    "a-slash-b": "a/b",
    "pct": "%2e%2e%2f",
    "emoji": "🧊 cold storage",
    "rtl-override": "abc\u202egnp.exe",  # format character, not control
    "looks-like-id": "v-" + "0" * 32,
    "spaces": "  name with spaces  ",
    "quote-comma": 'a,b="c";d',
}
REFUSED_NAMES = {
    "ascii-129": "n" * 129,
    "utf8-129": "é" * 64 + "n",
    "utf8-split-130": "ボ" * 43 + "n",  # 130 bytes, 44 characters
    "long-4k": "x" * 4096,
    "nul": "a\x00b",
    "nul-dotdot": "\x00/../etc",
    "newline": "a\nb",
    "cr": "a\rb",
    "tab": "a\tb",
    "escape": "\x1b[31mred",
    "del": "a\x7f",
    "c1-nel": "a\x85b",
    "empty": "",
}


def _name_cases() -> None:
    for key, name in ACCEPTED_NAMES.items():
        case(
            "name",
            key,
            "CreateVolume",
            lambda w, n=name: create_req(n),
            OK,
            verify=created_volume(name),
            churn=True,
        )
        case(
            "name",
            key,
            "CreateSnapshot",
            lambda w, n=name: csi_pb2.CreateSnapshotRequest(name=n, source_volume_id=w.vol),
            OK,
            verify=created_snapshot(name),
            churn=True,
        )
    # A name equal to an existing volume's ID or name of the other kind is just a name.
    case(
        "name",
        "existing-volume-id",
        "CreateVolume",
        lambda w: create_req(w.vol),
        OK,
        verify=created_volume(),
        churn=True,
    )
    for key, name in REFUSED_NAMES.items():
        case("name", key, "CreateVolume", lambda w, n=name: create_req(n), INVALID)
        case(
            "name",
            key,
            "CreateSnapshot",
            lambda w, n=name: csi_pb2.CreateSnapshotRequest(name=n, source_volume_id=w.vol),
            INVALID,
        )


# --- 3. capacities --------------------------------------------------------------------------------


def _capacity_cases() -> None:
    c = "capacity"
    for key, req, lim, code in (
        ("required-negative", -1, 0, INVALID),
        ("required-int64-min", -(2**63), 0, INVALID),
        ("limit-negative", 0, -1, INVALID),
        ("required-over-limit", 2 * GiB, GiB, INVALID),
        ("limit-1-byte", 0, 1, OUT_OF_RANGE),
        ("limit-below-ext4-minimum", 0, 512 * 1024, OUT_OF_RANGE),
        ("required-int64-max", INT64_MAX, 0, OUT_OF_RANGE),
        ("required-and-limit-int64-max", INT64_MAX, INT64_MAX, OUT_OF_RANGE),
        ("required-over-pool", 1 << 40, 0, EXHAUSTED),
    ):
        case(
            c, key, "CreateVolume", lambda w, r=req, l_=lim: create_req(required=r, limit=l_), code
        )
    case(
        c,
        "xfs-limit-below-minimum",
        "CreateVolume",
        lambda w: create_req(caps=[mcap("xfs")], required=0, limit=100 * MiB),
        OUT_OF_RANGE,
    )
    case(
        c,
        "block-limit-below-minimum",
        "CreateVolume",
        lambda w: create_req(caps=[bcap()], required=0, limit=4096),
        OUT_OF_RANGE,
    )
    for key, req, lim in (
        ("zero-zero", 0, 0),
        ("one-byte", 1, 0),
        ("limit-int64-max", 0, INT64_MAX),
    ):
        case(
            c,
            key,
            "CreateVolume",
            lambda w, r=req, l_=lim: create_req(required=r, limit=l_),
            OK,
            verify=created_volume(),
            churn=True,
        )

    def cexp(required: int, limit: int) -> Build:
        return lambda w: csi_pb2.ControllerExpandVolumeRequest(
            volume_id=w.idle,
            capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        )

    # ControllerExpandVolume is answered from the request alone (the code controller mode
    # serves): it refuses what is malformed in itself; a size below the volume's or above the
    # pool's is for NodeExpandVolume (below), which knows both, to refuse.
    for key, req, lim, code in (
        ("required-negative", -1, 0, INVALID),
        ("limit-negative", 0, -1, INVALID),
        ("required-over-limit", 2 * GiB, GiB, INVALID),
        ("empty-range", 0, 0, INVALID),
        ("limit-below-current", 0, MiB, OK),
        ("required-int64-max", INT64_MAX, 0, OUT_OF_RANGE),
        ("required-over-pool", 1 << 40, 0, OK),
        ("no-size-between", MiB + 1, MiB + 2, OUT_OF_RANGE),
    ):
        case(c, key, "ControllerExpandVolume", cexp(req, lim), code)
    case(
        c,
        "multi-node-capability",
        "ControllerExpandVolume",
        lambda w: csi_pb2.ControllerExpandVolumeRequest(
            volume_id=w.idle,
            capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
            volume_capability=mcap(mode=Mode.MULTI_NODE_MULTI_WRITER),
        ),
        INVALID,
    )
    case(
        c,
        "missing-range",
        "ControllerExpandVolume",
        lambda w: csi_pb2.ControllerExpandVolumeRequest(volume_id=w.idle),
        INVALID,
    )

    def nexp(required: int, limit: int) -> Build:
        return lambda w: csi_pb2.NodeExpandVolumeRequest(
            volume_id=w.vol,
            volume_path=w.target,
            capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        )

    for key, req, lim, code in (
        ("required-negative", -1, 0, INVALID),
        ("limit-negative", 0, -1, INVALID),
        ("required-over-limit", 2 * GiB, GiB, INVALID),
        ("limit-below-current", 0, MiB, OUT_OF_RANGE),
        ("required-int64-max", INT64_MAX, 0, OUT_OF_RANGE),
        ("required-over-pool", 1 << 40, 0, EXHAUSTED),
    ):
        case(c, key, "NodeExpandVolume", nexp(req, lim), code)
    # Capacity queries with hostile topology or capabilities report nothing, change nothing.
    case(
        c,
        "other-node-topology",
        "GetCapacity",
        lambda w: csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(segments={"topology.stowage.csi.io/node": "../x"})
        ),
        OK,
        verify=zero_capacity,
    )
    case(
        c,
        "multi-node-cap",
        "GetCapacity",
        lambda w: csi_pb2.GetCapacityRequest(
            volume_capabilities=[mcap(mode=Mode.MULTI_NODE_MULTI_WRITER)]
        ),
        OK,
        verify=zero_capacity,
    )
    case(
        c,
        "topology-elsewhere",
        "CreateVolume",
        lambda w: _with_topology(create_req(), {"topology.stowage.csi.io/node": "node-b"}),
        EXHAUSTED,
    )
    case(
        c,
        "topology-dotdot",
        "CreateVolume",
        lambda w: _with_topology(create_req(), {"topology.stowage.csi.io/node": "../" + NODE_ID}),
        EXHAUSTED,
    )


def _with_topology(req: csi_pb2.CreateVolumeRequest, seg: dict[str, str]) -> Message:
    req.accessibility_requirements.requisite.add(segments=seg)
    return req


# --- 4. capabilities and filesystem types ---------------------------------------------------------


def _no_mode() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())


def _no_type() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))


def _raw_mode(n: int) -> csi_pb2.VolumeCapability:
    cap = mcap()
    cap.access_mode.mode = n  # type: ignore[assignment]
    return cap


BAD_CAPS: dict[str, Callable[[], csi_pb2.VolumeCapability]] = {
    "no-access-mode": _no_mode,
    "unknown-mode": lambda: mcap(mode=Mode.UNKNOWN),
    "mode-99": lambda: _raw_mode(99),
    "mode-negative": lambda: _raw_mode(-1),
    "no-access-type": _no_type,
    "multi-node-reader": lambda: mcap(mode=Mode.MULTI_NODE_READER_ONLY),
    "multi-node-single-writer": lambda: mcap(mode=Mode.MULTI_NODE_SINGLE_WRITER),
    "multi-node-multi-writer": lambda: mcap(mode=Mode.MULTI_NODE_MULTI_WRITER),
    "block-multi-node": lambda: bcap(Mode.MULTI_NODE_MULTI_WRITER),
    "fs-ntfs": lambda: mcap("ntfs"),
    "fs-ext3": lambda: mcap("ext3"),
    "fs-upper": lambda: mcap("EXT4"),
    "fs-comma": lambda: mcap("ext4,suid"),
    "fs-dotdot": lambda: mcap("../ext4"),
    "fs-tmpfs": lambda: mcap("tmpfs"),
    "fs-proc": lambda: mcap("proc"),
    "fs-none-bind": lambda: mcap("none"),
    "fs-nul": lambda: mcap("ext4\x00"),
    "fs-space": lambda: mcap("ext4 "),
    "group-name": lambda: mcap(group="root"),
    "group-negative": lambda: mcap(group="-1"),
    "group-too-big": lambda: mcap(group="4294967295"),
    "group-injection": lambda: mcap(group="0,suid"),
}
# ValidateVolumeCapabilities answers "not confirmed" (OK with a message) for a well-formed but
# unsupported capability; a capability that is malformed on the wire is INVALID_ARGUMENT.
_MALFORMED = {"no-access-mode", "mode-99", "mode-negative", "no-access-type"}


def _cap_cases() -> None:
    c = "capability"
    for key, make in BAD_CAPS.items():
        case(c, key, "CreateVolume", lambda w, m=make: create_req(caps=[m()]), INVALID)
        case(
            c,
            key,
            "ValidateVolumeCapabilities",
            lambda w, m=make: csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=w.vol, volume_capabilities=[m()]
            ),
            INVALID if key in _MALFORMED else OK,
            verify=None if key in _MALFORMED else not_confirmed,
        )
        case(
            c,
            key,
            "NodeStageVolume",
            lambda w, m=make: csi_pb2.NodeStageVolumeRequest(
                volume_id=w.idle, staging_target_path=w.fresh("stage"), volume_capability=m()
            ),
            INVALID,
        )
        case(
            c,
            key,
            "NodePublishVolume",
            lambda w, m=make: csi_pb2.NodePublishVolumeRequest(
                volume_id=w.vol,
                staging_target_path=w.staging,
                target_path=w.fresh("pub"),
                volume_capability=m(),
            ),
            INVALID,
        )
    case(c, "no-capabilities", "CreateVolume", lambda w: create_req(caps=[]), INVALID)
    case(c, "block-and-mount", "CreateVolume", lambda w: create_req(caps=[bcap(), mcap()]), INVALID)
    case(
        c,
        "ext4-and-xfs",
        "CreateVolume",
        lambda w: create_req(caps=[mcap("ext4"), mcap("xfs")]),
        INVALID,
    )
    case(
        c,
        "cap-vs-param-fstype",
        "CreateVolume",
        lambda w: create_req(caps=[mcap("ext4")], params={"csi.storage.k8s.io/fstype": "xfs"}),
        INVALID,
    )
    case(
        c,
        "no-capability",
        "ValidateVolumeCapabilities",
        lambda w: csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=w.vol),
        INVALID,
    )
    case(
        c,
        "no-capability",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.idle, staging_target_path=w.fresh("s")
        ),
        INVALID,
    )
    # Access type that does not match the volume.
    case(
        c,
        "block-on-mount-volume",
        "ValidateVolumeCapabilities",
        lambda w: csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=w.vol, volume_capabilities=[bcap()]
        ),
        OK,
        verify=not_confirmed,
    )
    case(
        c,
        "block-on-mount-volume",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.idle, staging_target_path=w.fresh("stage"), volume_capability=bcap()
        ),
        PRECONDITION,
    )
    case(
        c,
        "mount-on-block-volume",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.block, staging_target_path=w.fresh("stage"), volume_capability=mcap()
        ),
        PRECONDITION,
    )
    case(
        c,
        "xfs-on-ext4-volume",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.fresh("pub"),
            volume_capability=mcap("xfs"),
        ),
        PRECONDITION,
    )
    case(
        c,
        "readonly-stage-unformatted",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.idle,
            staging_target_path=w.fresh("stage"),
            volume_capability=mcap(mode=Mode.SINGLE_NODE_READER_ONLY),
        ),
        PRECONDITION,
    )
    # StorageClass parameters.
    for key, params in (
        ("unknown-key", {"mkfsOptions": "-O ^has_journal"}),
        ("fstype-proc", {"fsType": "proc"}),
        ("fstype-injection", {"csi.storage.k8s.io/fstype": "ext4 -E root_owner=0:0"}),
        ("preallocate-yes", {"preallocate": "yes"}),
        ("huge-map", {"csi.storage.k8s.io/pvc/name": "x" * 5000}),
        ("provisioner-secret-key", {"csi.storage.k8s.io/provisioner-secret-name": "s"}),
    ):
        case("parameters", key, "CreateVolume", lambda w, p=params: create_req(params=p), INVALID)
    case(
        "parameters",
        "pvc-name-dotdot",
        "CreateVolume",
        lambda w: create_req(
            params={
                "csi.storage.k8s.io/pvc/name": "../../etc",
                "csi.storage.k8s.io/pvc/namespace": "/",
            }
        ),
        OK,
        verify=created_volume(),
        churn=True,
    )
    case(
        "parameters",
        "snapshot-params",
        "CreateSnapshot",
        lambda w: csi_pb2.CreateSnapshotRequest(
            name=uniq("snap"), source_volume_id=w.vol, parameters={"path": "/etc"}
        ),
        INVALID,
    )


# --- 5. mount flags -------------------------------------------------------------------------------

REFUSED_FLAGS: dict[str, list[str]] = {
    "exec": ["exec"],
    "suid": ["suid"],
    "dev": ["dev"],
    "bind": ["bind"],
    "rbind": ["rbind"],
    "remount": ["remount"],
    "move": ["move"],
    "defaults": ["defaults"],
    "user": ["user"],
    "owner": ["owner"],
    "loop": ["loop"],
    "shared": ["shared"],
    "make-rshared": ["make-rshared"],
    "comma-ro-suid": ["ro,suid"],
    "comma-nosuid-exec": ["nosuid,exec"],
    "comma-nodev-dev": ["nodev,dev"],
    "comma-trailing": ["noatime,", "suid"],
    "valued-then-suid": ["commit=5,suid"],
    "data-then-exec": ["data=ordered,exec"],
    "eq-suid": ["suid=1"],
    "eq-prefix": ["=suid"],
    "eq-empty-commit": ["commit="],
    "commit-injection": ["commit=5;suid"],
    "newline": ["noatime\nsuid"],
    "newline-only-key": ["nosuid\nexec"],
    "space-inside": ["noatime suid"],
    "tab": ["suid\t"],
    "padded": [" suid "],
    "nul": ["noatime\x00suid"],
    "errors-panic": ["errors=panic"],
    "uid-0": ["uid=0"],
    "mode-4777": ["mode=4777"],
    "offset": ["offset=0"],
    "x-mount-mkdir": ["x-mount.mkdir"],
    "lowerdir": ["lowerdir=/etc"],
    "context-quoted-suid": ['context="system_u:object_r:foo_t:s0,suid"'],
    "context-after-quote": ['context="system_u:object_r:foo_t:s0",suid'],
    "context-unbalanced": ['context="system_u:object_r:foo_t:s0'],
    "context-unquoted-comma": ["context=system_u:object_r:foo_t:s0:c1,c2"],
    "context-path": ['context="../../etc:a:b:s0"'],
    "nosymfollow-unknown": ["nosymfollow"],
    "long": ["noatime," * 2000],
}


def _flag_cases() -> None:
    c = "mount-flags"
    for key, flags in REFUSED_FLAGS.items():
        case(
            c,
            key,
            "NodeStageVolume",
            lambda w, f=flags: csi_pb2.NodeStageVolumeRequest(
                volume_id=w.idle,
                staging_target_path=w.fresh("stage"),
                volume_capability=mcap(flags=f),
            ),
            INVALID,
        )
        case(
            c,
            key,
            "NodePublishVolume",
            lambda w, f=flags: csi_pb2.NodePublishVolumeRequest(
                volume_id=w.vol,
                staging_target_path=w.staging,
                target_path=w.fresh("pub"),
                volume_capability=mcap(flags=f),
            ),
            INVALID,
        )
        case(c, key, "CreateVolume", lambda w, f=flags: create_req(caps=[mcap(flags=f)]), INVALID)
    # rw in a capability whose access mode is read-only contradicts itself.
    ro = Mode.SINGLE_NODE_READER_ONLY
    case(
        c,
        "rw-on-reader-only",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.idle,
            staging_target_path=w.fresh("stage"),
            volume_capability=mcap(mode=ro, flags=["rw"]),
        ),
        INVALID,
    )
    case(
        c,
        "rw-on-reader-only",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.fresh("pub"),
            volume_capability=mcap(mode=ro, flags=["rw"]),
        ),
        INVALID,
    )
    case(
        c,
        "rw-on-reader-only",
        "CreateVolume",
        lambda w: create_req(caps=[mcap(mode=ro, flags=["noatime,rw"])]),
        INVALID,
    )
    # Accepted flags: the mount still carries nosuid,nodev, and readonly wins over "rw".
    case(
        c,
        "noatime-noexec",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.fresh("pub"),
            volume_capability=mcap(flags=["noatime", "noexec"]),
        ),
        OK,
        verify=published_with({"nosuid", "nodev", "noexec", "noatime"}),
        churn=True,
    )
    case(
        c,
        "readonly-publish-with-rw-flag",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.fresh("pub"),
            volume_capability=mcap(flags=["rw"]),
            readonly=True,
        ),
        OK,
        verify=published_with({"nosuid", "nodev", "ro"}),
        churn=True,
    )


_LAST_TARGET: dict[str, str] = {}


def published_with(options: set[str]) -> Check:
    def check(w: World, resp: Any) -> None:
        target = _LAST_TARGET["path"]
        top = mountinfo.top_mount_at(target)
        assert top is not None, f"{target} is not mounted"
        assert options <= set(top.options), (options, top.options)
        assert "suid" not in top.options and "dev" not in top.options
        w.client.unpublish(w.vol, target)
        assert not os.path.exists(target)

    return check


# --- 6. paths -------------------------------------------------------------------------------------


def _path_cases() -> None:
    c = "path"
    bad_paths: dict[str, tuple[Callable[[World], str], grpc.StatusCode]] = {
        "relative": (lambda w: "work/target", INVALID),
        "dot-relative": (lambda w: "./target", INVALID),
        "bare-name": (lambda w: "target", INVALID),
        "dotdot-to-outside": (lambda w: os.path.join(w.work, "..", "outside", "new"), INVALID),
        "dotdot-inside": (lambda w: os.path.join(w.work, "x", "..", "new"), INVALID),
        "symlink-itself": (lambda w: w.link, INVALID),
        "symlink-parent": (lambda w: os.path.join(w.link, "new"), INVALID),
        "symlink-parent-existing": (lambda w: os.path.join(w.link, "sub"), INVALID),
        "nul": (lambda w: w.fresh("t") + "\x00/../../etc", INVALID),
        "too-long": (lambda w: "/" + "a/" * 3000, INVALID),
        "inside-pool": (lambda w: os.path.join(w.pool.mount, "volumes"), INVALID),
        "pool-root": (lambda w: w.pool.mount, INVALID),
        "pool-parent": (lambda w: w.pool.base, INVALID),
    }
    for key, (path, code) in bad_paths.items():
        case(
            c,
            key,
            "NodeStageVolume",
            lambda w, p=path: csi_pb2.NodeStageVolumeRequest(
                volume_id=w.idle, staging_target_path=p(w), volume_capability=mcap()
            ),
            code,
        )
        case(
            c,
            key,
            "NodeStageVolume(block)",
            lambda w, p=path: csi_pb2.NodeStageVolumeRequest(
                volume_id=w.block, staging_target_path=p(w), volume_capability=bcap()
            ),
            code,
        )
        case(
            c,
            key,
            "NodePublishVolume",
            lambda w, p=path: csi_pb2.NodePublishVolumeRequest(
                volume_id=w.vol,
                staging_target_path=w.staging,
                target_path=p(w),
                volume_capability=mcap(),
            ),
            code,
        )
        case(
            c,
            key,
            "NodePublishVolume(staging)",
            lambda w, p=path: csi_pb2.NodePublishVolumeRequest(
                volume_id=w.vol,
                staging_target_path=p(w),
                target_path=w.fresh("pub"),
                volume_capability=mcap(),
            ),
            code,
        )
        case(
            c,
            key,
            "NodeUnpublishVolume",
            lambda w, p=path: csi_pb2.NodeUnpublishVolumeRequest(volume_id=w.vol, target_path=p(w)),
            code,
        )
        case(
            c,
            key,
            "NodeUnstageVolume",
            lambda w, p=path: csi_pb2.NodeUnstageVolumeRequest(
                volume_id=w.idle, staging_target_path=p(w)
            ),
            code,
        )
    for key in ("relative", "dotdot-to-outside", "symlink-itself", "nul"):
        path = bad_paths[key][0]
        case(
            c,
            key,
            "NodeGetVolumeStats",
            lambda w, p=path: csi_pb2.NodeGetVolumeStatsRequest(volume_id=w.vol, volume_path=p(w)),
            NOT_FOUND,
        )
        case(
            c,
            key,
            "NodeExpandVolume",
            lambda w, p=path: csi_pb2.NodeExpandVolumeRequest(volume_id=w.vol, volume_path=p(w)),
            NOT_FOUND,
        )
    # Paths that are real and absolute but are not where this volume lives.
    case(
        c,
        "outside-dir",
        "NodeGetVolumeStats",
        lambda w: csi_pb2.NodeGetVolumeStatsRequest(volume_id=w.vol, volume_path=w.outside),
        NOT_FOUND,
    )
    case(
        c,
        "foreign-mount",
        "NodeGetVolumeStats",
        lambda w: csi_pb2.NodeGetVolumeStatsRequest(volume_id=w.vol, volume_path=w.foreign),
        NOT_FOUND,
    )
    case(
        c,
        "foreign-mount",
        "NodeExpandVolume",
        lambda w: csi_pb2.NodeExpandVolumeRequest(volume_id=w.vol, volume_path=w.foreign),
        NOT_FOUND,
    )
    case(
        c,
        "target-is-staging",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.staging,
            volume_capability=mcap(),
        ),
        INVALID,
    )
    case(
        c,
        "target-inside-staging",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=os.path.join(w.staging, "lost+found"),
            volume_capability=mcap(),
        ),
        INVALID,
    )
    case(
        c,
        "target-is-foreign-mount",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.foreign,
            volume_capability=mcap(),
        ),
        PRECONDITION,
    )
    case(
        c,
        "target-is-outside-file",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=os.path.join(w.outside, "data"),
            volume_capability=mcap(),
        ),
        INVALID,
    )
    case(
        c,
        "stage-on-foreign-mount",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.idle, staging_target_path=w.foreign, volume_capability=mcap()
        ),
        PRECONDITION,
    )
    case(
        c,
        "stage-on-other-volumes-staging",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.idle, staging_target_path=w.staging, volume_capability=mcap()
        ),
        PRECONDITION,
    )
    case(
        c,
        "publish-other-volume-from-staging",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.idle,
            staging_target_path=w.staging,
            target_path=w.fresh("pub"),
            volume_capability=mcap(),
        ),
        PRECONDITION,
    )
    case(
        c,
        "stage-elsewhere-while-staged",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.vol, staging_target_path=w.fresh("stage"), volume_capability=mcap()
        ),
        PRECONDITION,
    )
    case(
        c,
        "unstage-while-published",
        "NodeUnstageVolume",
        lambda w: csi_pb2.NodeUnstageVolumeRequest(volume_id=w.vol, staging_target_path=w.staging),
        PRECONDITION,
    )
    case(
        c,
        "unstage-foreign-mount",
        "NodeUnstageVolume",
        lambda w: csi_pb2.NodeUnstageVolumeRequest(volume_id=w.idle, staging_target_path=w.foreign),
        PRECONDITION,
    )
    case(
        c,
        "unpublish-other-volumes-target",
        "NodeUnpublishVolume",
        lambda w: csi_pb2.NodeUnpublishVolumeRequest(volume_id=w.idle, target_path=w.target),
        PRECONDITION,
    )
    case(
        c,
        "unpublish-foreign-mount",
        "NodeUnpublishVolume",
        lambda w: csi_pb2.NodeUnpublishVolumeRequest(volume_id=w.idle, target_path=w.foreign),
        PRECONDITION,
    )
    case(
        c,
        "unpublish-staging-path",
        "NodeUnpublishVolume",
        lambda w: csi_pb2.NodeUnpublishVolumeRequest(volume_id=w.vol, target_path=w.staging),
        PRECONDITION,
    )
    # Unpublish of a path Stowage never published: nothing there is ours to delete.
    for key, path in (
        ("outside-file", lambda w: os.path.join(w.outside, "data")),
        ("outside-empty-file", lambda w: os.path.join(w.outside, "empty")),
        ("outside-dir", lambda w: os.path.join(w.outside, "sub")),
        ("outside-root", lambda w: w.outside),
    ):
        case(
            c,
            f"never-published-{key}",
            "NodeUnpublishVolume",
            lambda w, p=path: csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=w.idle, target_path=p(w)
            ),
            OK,
        )
        case(
            c,
            f"never-staged-{key}",
            "NodeUnstageVolume",
            lambda w, p=path: csi_pb2.NodeUnstageVolumeRequest(
                volume_id=w.idle, staging_target_path=p(w)
            ),
            OK,
        )


# --- 7. secrets -----------------------------------------------------------------------------------


def _secret_cases() -> None:
    """Every request in this module carries the canary; these are the calls that succeed or
    fail deep inside the driver, where a careless log line would print the request."""
    c = "secrets"
    case(
        c, "create", "CreateVolume", lambda w: create_req(), OK, verify=created_volume(), churn=True
    )
    case(c, "create-invalid", "CreateVolume", lambda w: create_req(required=-5), INVALID)
    case(
        c,
        "delete-unknown",
        "DeleteVolume",
        lambda w: csi_pb2.DeleteVolumeRequest(volume_id="v-" + "1" * 32),
        OK,
    )
    case(
        c,
        "validate",
        "ValidateVolumeCapabilities",
        lambda w: csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=w.vol, volume_capabilities=[mcap()]
        ),
        OK,
    )
    case(
        c,
        "expand",
        "ControllerExpandVolume",
        lambda w: csi_pb2.ControllerExpandVolumeRequest(
            volume_id=w.idle, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
        ),
        OK,
    )
    case(
        c,
        "snapshot",
        "CreateSnapshot",
        lambda w: csi_pb2.CreateSnapshotRequest(name="secret-snap", source_volume_id=w.vol),
        OK,
        verify=created_snapshot("secret-snap"),
        churn=True,
    )
    case(
        c,
        "snapshot-delete",
        "DeleteSnapshot",
        lambda w: csi_pb2.DeleteSnapshotRequest(snapshot_id="s-" + "2" * 32),
        OK,
    )
    case(
        c,
        "snapshot-get",
        "GetSnapshot",
        lambda w: csi_pb2.GetSnapshotRequest(snapshot_id=w.snap),
        OK,
    )
    case(
        c,
        "snapshot-list",
        "ListSnapshots",
        lambda w: csi_pb2.ListSnapshotsRequest(snapshot_id=w.snap),
        OK,
    )
    case(
        c,
        "node-stage-again",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.vol, staging_target_path=w.staging, volume_capability=mcap("ext4")
        ),
        OK,
    )
    case(
        c,
        "node-publish-again",
        "NodePublishVolume",
        lambda w: csi_pb2.NodePublishVolumeRequest(
            volume_id=w.vol,
            staging_target_path=w.staging,
            target_path=w.target,
            volume_capability=mcap("ext4"),
        ),
        OK,
    )
    case(
        c,
        "node-expand-same-size",
        "NodeExpandVolume",
        lambda w: csi_pb2.NodeExpandVolumeRequest(
            volume_id=w.vol,
            volume_path=w.target,
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        ),
        OK,
    )
    case(
        c,
        "node-stage-bad-flag",
        "NodeStageVolume",
        lambda w: csi_pb2.NodeStageVolumeRequest(
            volume_id=w.vol, staging_target_path=w.staging, volume_capability=mcap(flags=["suid"])
        ),
        INVALID,
    )


_id_cases()
_removed_rpc_cases()
_mutable_cases()
_name_cases()
_capacity_cases()
_cap_cases()
_flag_cases()
_path_cases()
_secret_cases()

_ids = [c.id for c in CASES]
assert len(_ids) == len(set(_ids)), [i for i, n in collections.Counter(_ids).items() if n > 1]


@pytest.mark.parametrize("hostile", CASES, ids=_ids)
def test_hostile(world: World, hostile: Case) -> None:
    w = world
    req = hostile.build(w)
    has_secrets = _with_secrets(req)
    target = getattr(req, "target_path", "")
    if target:
        _LAST_TARGET["path"] = target
    new_log(w)
    before = snapshot(w)
    rpc = hostile.rpc.split("(")[0]
    code, resp, details = call(w, rpc, req)
    assert w.driver.proc is not None and w.driver.proc.poll() is None, "the driver died"
    assert code == hostile.code, (
        f"{hostile.id}: got {code.name} ({details}), want {hostile.code.name}"
    )
    if rpc == "ControllerExpandVolume":  # what controller mode serves: the same answer there
        try:
            w.controller.controller.ControllerExpandVolume(req, timeout=60)
            ctl_code, ctl_details = OK, ""
        except grpc.RpcError as exc:
            ctl_code, ctl_details = exc.code(), exc.details() or ""
        assert ctl_code == hostile.code, (
            f"{hostile.id} in controller mode: got {ctl_code.name} ({ctl_details})"
        )
        w.controller_cases += 1
    if hostile.verify is not None:
        hostile.verify(w, resp)
    after = snapshot(w)
    if hostile.churn:
        before, after = _without_trash(before), _without_trash(after)
    assert before == after, f"{hostile.id} changed state:\n{_diff(before, after)}"
    logged = new_log(w)
    assert CANARY not in logged, f"{hostile.id}: the secret reached the log"
    if has_secrets:
        assert MASK in logged, f"{hostile.id}: the request was not logged with secrets stripped"
    w.counts[hostile.category] += 1


def test_log_is_json_and_has_no_secret(world: World) -> None:
    """The whole log of the module's driver: every line is a JSON object, none has the canary
    (nor has the controller-mode driver's)."""
    assert world.controller_cases > 0
    assert CANARY not in world.controller_driver.log()
    text = world.driver.log()
    assert CANARY not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) > sum(world.counts.values())
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line[:300]!r}") from None
        assert {"ts", "level", "logger", "msg"} <= set(doc)
    assert sum(MASK in line for line in lines) >= min(100, sum(world.counts.values()))


def test_secrets_never_logged_text_format() -> None:
    """A second driver with text logs at debug level: a full life cycle with secrets everywhere,
    plus failures, and the canary appears in no line."""
    pool, teardown = make_pool(size=8 << 30)
    driver = DriverProcess(pool, "--log-level", "debug", node_id=NODE_ID)
    client: Client | None = None
    try:
        client = driver.start()
        work = os.path.join(pool.base, "work")
        staging, target = os.path.join(work, "staging"), os.path.join(work, "target")
        os.makedirs(staging)
        cap = mcap("xfs")

        def run(rpc: str, req: Message, want: grpc.StatusCode = OK) -> Any:
            assert _with_secrets(req), rpc
            stub = client.node if rpc.startswith("Node") else client.controller
            try:
                resp = getattr(stub, rpc)(req, timeout=120)
            except grpc.RpcError as exc:
                assert exc.code() == want, (rpc, exc.code(), exc.details())
                return None
            assert want == OK, rpc
            return resp

        vol = run("CreateVolume", create_req("text", [cap], required=300 * MiB)).volume.volume_id
        run(
            "ControllerPublishVolume",
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vol, node_id=NODE_ID, volume_capability=cap
            ),
            UNIMPLEMENTED,
        )
        run(
            "NodeStageVolume",
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vol, staging_target_path=staging, volume_capability=cap
            ),
        )
        run(
            "NodePublishVolume",
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vol,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap,
            ),
        )
        run(
            "NodePublishVolume",
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vol,
                staging_target_path=staging,
                target_path=target,
                volume_capability=mcap("xfs", flags=["suid"]),
            ),
            INVALID,
        )
        run(
            "ControllerExpandVolume",
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vol, capacity_range=csi_pb2.CapacityRange(required_bytes=400 * MiB)
            ),
        )
        run(
            "NodeExpandVolume",
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vol,
                volume_path=target,
                capacity_range=csi_pb2.CapacityRange(required_bytes=400 * MiB),
            ),
        )
        snap = run(
            "CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="text-snap", source_volume_id=vol)
        ).snapshot.snapshot_id
        run(
            "ValidateVolumeCapabilities",
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vol, volume_capabilities=[cap]),
        )
        run("ListSnapshots", csi_pb2.ListSnapshotsRequest())
        run("GetSnapshot", csi_pb2.GetSnapshotRequest(snapshot_id=snap))
        client.unpublish(vol, target)
        client.unstage(vol, staging)
        run(
            "ControllerUnpublishVolume",
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol, node_id=NODE_ID),
            UNIMPLEMENTED,
        )
        run("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap))
        run("DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol))
        run("DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id="../../etc"))
        run("CreateVolume", create_req("bad\n", [cap]), INVALID)
        # A volume handle or name that tries to start a log line of its own.
        forged = "\n2001-01-01 00:00:00,000 INFO driver: FORGED"
        for sep in ("\n", "\r", "\x85", "\u2028", "\u2029", "\x0b"):
            run(
                "DeleteVolume",
                csi_pb2.DeleteVolumeRequest(volume_id="v-x" + forged.replace("\n", sep)),
            )
            run(
                "CreateVolume",
                create_req("n" + forged.replace("\n", sep), [cap], required=-1),
                INVALID,
            )
        time.sleep(0.2)
        text = driver.log()
        assert CANARY not in text
        assert text.count(MASK) >= 15
        lines = text.splitlines()  # splits on every Unicode line boundary, not just \n
        assert not [line for line in lines if line.lstrip().startswith("2001-01-01")], (
            "a request forged a log line"
        )
    finally:
        if client is not None:
            client.close()
        driver.stop()
        teardown()


def test_socket_is_owner_and_group_only(world: World) -> None:
    """The CSI socket takes unauthenticated calls: only its owner and group may connect."""
    st = os.lstat(world.driver.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)


def test_volume_mounts_carry_nosuid_nodev(world: World) -> None:
    """The staging mount and its bind at the target, made with no mount options at all."""
    for path in (world.staging, world.target):
        top = mountinfo.top_mount_at(path)
        assert top is not None, path
        assert {"nosuid", "nodev"} <= set(top.options), (path, top.options)
