"""ModifyVolume (issue 18): mutable parameters checked, stored in row and image record, applied to
the pods that publish the volume (FakeHost records what reaches the cgroups), and the cgroup
writer itself on a fake cgroup tree (v1 per cgroup, v2 io.max once)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from driver import validation
from driver.core.controller import ControllerCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.core.vacwatch import AttributesWatch
from driver.errors import InvalidArgument, NotFound
from driver.host import cgroups
from driver.host.mountinfo import MountEntry
from driver.model import (
    AccessMode,
    AccessType,
    Capability,
    CapacityRange,
    IoLimits,
    MiB,
    Volume,
)
from driver.records import ImageRecord
from driver.storage.store import Store
from tests.unit.fakes import FakeHost

RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
DEV = "/dev/loop900"
POD = "0a1b2c3d-0000-4000-8000-00000000abcd"
RIOPS = "stowage.csi.io/read-iops"
WIOPS = "stowage.csi.io/write-iops"
RBPS = "stowage.csi.io/read-bps"
WBPS = "stowage.csi.io/write-bps"


def make(controller: ControllerCore, mutable: dict[str, str] | None = None) -> Volume:
    return controller.create_volume(
        "pvc", [RW], CapacityRange(16 * MiB), {"fsType": "ext4"}, None, mutable=mutable
    )


# --- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ({RIOPS: "1000"}, {RIOPS: "1000"}),
        ({WBPS: "50Mi"}, {WBPS: str(50 << 20)}),
        ({RBPS: "10M", WIOPS: "7"}, {RBPS: "10000000", WIOPS: "7"}),
        ({RBPS: "4096"}, {RBPS: "4096"}),
        ({}, {}),
    ],
)
def test_mutable_parameters_are_normalised(
    requested: dict[str, str], expected: dict[str, str]
) -> None:
    assert validation.merge_mutable_parameters({}, requested) == expected


@pytest.mark.parametrize(
    "requested",
    [
        {"XXX_FakeKey": "XXX_FakeValue"},
        {"fsType": "xfs"},  # immutable: a StorageClass parameter
        {"preallocate": "true"},
        {RIOPS: "0"},
        {RIOPS: "-1"},
        {RIOPS: ""},
        {RIOPS: "1.5"},
        {RIOPS: "1e3"},
        {RIOPS: "ten"},
        {RIOPS: " 10"},
        {RIOPS: "10000001"},
        {RIOPS: "99999999999999999999"},
        {WBPS: "4095"},
        {WBPS: "2Ti"},
        {WBPS: "-50Mi"},
        {WBPS: "50MB"},
        {WBPS: "50m"},
        {RIOPS: "100", "bogus": "1"},  # one bad key refuses the whole request
    ],
)
def test_bad_mutable_parameters_are_invalid(requested: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        validation.merge_mutable_parameters({RIOPS: "5"}, requested)


def test_merge_keeps_unmentioned_and_unlimited_lifts() -> None:
    cur = {RIOPS: "100", WBPS: "8192"}
    assert validation.merge_mutable_parameters(cur, {WIOPS: "9"}) == {**cur, WIOPS: "9"}
    assert validation.merge_mutable_parameters(cur, {RIOPS: "unlimited"}) == {WBPS: "8192"}
    assert validation.io_limits(cur) == IoLimits(read_iops=100, write_bps=8192)
    assert IoLimits().unlimited and not validation.io_limits(cur).unlimited


# --- store and record ---------------------------------------------------------------------------
def test_create_with_mutable_parameters_persists_in_row_and_record(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    v = make(controller, {RIOPS: "1000"})
    assert v.mutable_parameters == {RIOPS: "1000"}
    row = ctx.store.get_volume(v.id)
    assert row is not None and row.mutable_parameters == {RIOPS: "1000"}
    record = ctx.backend.read_record(v.id)
    assert record is not None and record.volume().mutable_parameters == {RIOPS: "1000"}
    assert ImageRecord.from_json(record.to_json()) == record


def test_create_with_bad_mutable_parameters_creates_nothing(
    controller: ControllerCore, ctx: PoolContext
) -> None:
    with pytest.raises(InvalidArgument):
        make(controller, {"XXX_FakeKey": "XXX_FakeValue"})
    assert ctx.store.list_volumes() == [] and not ctx.backend.volume_ids()


def test_store_made_before_the_columns_gains_them(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "meta.db")
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE volumes (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL, access_type TEXT NOT NULL, fs_type TEXT NOT NULL,
        formatted INTEGER NOT NULL, source_kind TEXT, source_id TEXT, parameters TEXT NOT NULL,
        created_at REAL NOT NULL, sector_size INTEGER NOT NULL);
        CREATE TABLE publications (target TEXT PRIMARY KEY, volume_id TEXT NOT NULL,
        readonly INTEGER NOT NULL, access_mode INTEGER NOT NULL);
        INSERT INTO volumes VALUES ('v-00000000000000000000000000000001', 'old', 1, 'mount',
        'ext4', 1, NULL, NULL, '{}', 0, 4096);
        INSERT INTO publications VALUES ('/t', 'v-00000000000000000000000000000001', 0, 1);"""
    )
    db.commit()
    db.close()
    store = Store(path)
    try:
        vol = store.get_volume("v-00000000000000000000000000000001")
        assert vol is not None and vol.mutable_parameters == {}
        store.set_mutable_parameters(vol.id, {RIOPS: "5"})
        vol = store.get_volume(vol.id)
        assert vol is not None and vol.mutable_parameters == {RIOPS: "5"}
        pub = store.publication("/t")
        assert pub is not None and pub.pod_uid == ""
    finally:
        store.close()


# --- modify on the node -------------------------------------------------------------------------
def test_modify_unpublished_volume_applies_at_next_publish(
    controller: ControllerCore,
    node: NodeCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    host.pod_cgroups[POD] = 2
    node.limits.modify(v.id, {RIOPS: "1000", WBPS: "1Mi"})
    assert host.io_limits == {}  # nothing published: nothing to write yet
    node.stage(v.id, staging, RW)
    node.publish(v.id, staging, target, RW, False, pod_uid=POD)
    assert host.io_limits == {(POD, DEV): IoLimits(read_iops=1000, write_bps=1 << 20)}
    pub = ctx.store.publication(target)
    assert pub is not None and pub.pod_uid == POD


def test_modify_published_volume_applies_at_once_and_survives_restart(
    controller: ControllerCore,
    node: NodeCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller, {RIOPS: "500"})
    host.pod_cgroups[POD] = 1
    node.publish(v.id, staging, target, RW, False, pod_uid=POD)
    assert host.io_limits[(POD, DEV)] == IoLimits(read_iops=500)
    node.limits.modify(v.id, {RIOPS: "2000", WIOPS: "300"})
    assert host.io_limits[(POD, DEV)] == IoLimits(read_iops=2000, write_iops=300)
    node.limits.modify(v.id, {RIOPS: "unlimited"})
    assert host.io_limits[(POD, DEV)] == IoLimits(write_iops=300)
    # A restarted driver (a new core on the same store) writes them again.
    host.io_limits.clear()
    assert NodeCore(ctx).limits.reapply() == 1
    assert host.io_limits[(POD, DEV)] == IoLimits(write_iops=300)
    record = ctx.backend.read_record(v.id)
    assert record is not None and record.mutable_parameters == {WIOPS: "300"}


def test_refused_modify_changes_nothing(
    controller: ControllerCore,
    node: NodeCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller, {RIOPS: "500"})
    host.pod_cgroups[POD] = 1
    node.publish(v.id, staging, target, RW, False, pod_uid=POD)
    before = (ctx.store.get_volume(v.id), ctx.backend.read_record(v.id), dict(host.io_limits))
    for bad in ({RIOPS: "0"}, {WIOPS: "100", "XXX_FakeKey": "1"}, {"fsType": "xfs"}):
        with pytest.raises(InvalidArgument):
            node.limits.modify(v.id, bad)
    assert (ctx.store.get_volume(v.id), ctx.backend.read_record(v.id), host.io_limits) == before
    with pytest.raises(NotFound):
        node.limits.modify("v-" + "f" * 32, {RIOPS: "5"})
    with pytest.raises(NotFound):
        node.limits.modify("non-existing-volume-id", {RIOPS: "5"})
    with pytest.raises(InvalidArgument):
        node.limits.modify("", {RIOPS: "5"})


def test_publish_without_pod_uid_or_pod_cgroup_still_publishes(
    controller: ControllerCore,
    node: NodeCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller, {RIOPS: "500"})
    node.publish(v.id, staging, target, RW, False)  # no podInfoOnMount: logged, not applied
    assert host.io_limits == {} and ctx.store.publication(target) is not None
    with pytest.raises(InvalidArgument):
        node.publish(v.id, staging, target + "2", RW, False, pod_uid="../../etc")
    # Pod cgroup not there yet: reconciliation applies once it is.
    node.publish(v.id, staging, target + "3", RW, False, pod_uid=POD)
    assert host.io_limits == {}
    host.pod_cgroups[POD] = 1
    assert node.limits.reapply() == 1 and host.io_limits[(POD, DEV)] == IoLimits(read_iops=500)


# --- the cgroup writer --------------------------------------------------------------------------
def _tree(root: str, files: tuple[str, ...], *dirs: str) -> None:
    for d in ("", *dirs):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        for f in files:
            with open(os.path.join(root, d, f), "w", encoding="ascii"):
                pass


def _read(path: str) -> str:
    with open(path, encoding="ascii") as fh:
        return fh.read()


V1 = tuple(name for _f, name in cgroups._V1_FILES)


@pytest.mark.parametrize(
    "pod_dir",
    [
        f"kubepods/burstable/pod{POD}",  # cgroupfs driver
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}"
        ".slice",  # systemd driver
    ],
)
def test_v1_limits_go_into_the_pod_and_every_cgroup_below(
    tmp_path: os.PathLike[str], pod_dir: str
) -> None:
    root = os.path.join(str(tmp_path), "blkio")
    other = "kubepods/burstable/pod11111111-0000-4000-8000-000000000000/c"
    _tree(root, V1, pod_dir, f"{pod_dir}/ctr-a", f"{pod_dir}/ctr-b", other)
    h = cgroups.IoHierarchy(root, 1)
    assert cgroups.apply(h, POD, 7, 3, IoLimits(read_iops=1000, write_bps=4096)) == 3
    for d in (pod_dir, f"{pod_dir}/ctr-a", f"{pod_dir}/ctr-b"):
        assert _read(os.path.join(root, d, "blkio.throttle.read_iops_device")) == "7:3 1000\n"
        assert _read(os.path.join(root, d, "blkio.throttle.write_bps_device")) == "7:3 4096\n"
        assert _read(os.path.join(root, d, "blkio.throttle.write_iops_device")) == "7:3 0\n"
    assert _read(os.path.join(root, other, "blkio.throttle.read_iops_device")) == ""
    assert cgroups.apply(h, "22222222-0000-4000-8000-000000000000", 7, 3, IoLimits(1)) == 0


def test_v2_limits_go_into_the_pod_cgroup_once(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "unified")
    pod_dir = f"kubepods/pod{POD}"
    _tree(root, ("io.max",), pod_dir, f"{pod_dir}/ctr")
    h = cgroups.IoHierarchy(root, 2)
    assert cgroups.apply(h, POD, 7, 3, IoLimits(read_iops=1000, write_bps=8192)) == 1
    assert _read(os.path.join(root, pod_dir, "io.max")) == (
        "7:3 riops=1000 wiops=max rbps=max wbps=8192\n"
    )
    assert _read(os.path.join(root, pod_dir, "ctr", "io.max")) == ""


def _mount(fs: str, point: str, sup: tuple[str, ...], root: str = "/") -> MountEntry:
    return MountEntry(1, 0, 0, 1, root, point, ("rw",), fs, fs, sup)


def test_io_hierarchy_prefers_v1_blkio_then_v2_io(tmp_path: os.PathLike[str]) -> None:
    unified = os.path.join(str(tmp_path), "unified")
    os.makedirs(unified)
    with open(os.path.join(unified, "cgroup.controllers"), "w", encoding="ascii") as fh:
        fh.write("cpuset cpu io memory pids\n")
    v2 = _mount("cgroup2", unified, ("rw",))
    v1 = _mount("cgroup", "/sys/fs/cgroup/blkio", ("rw", "blkio"))
    cpu = _mount("cgroup", "/sys/fs/cgroup/cpu", ("rw", "cpu"))
    assert cgroups.io_hierarchy([cpu, v2, v1]) == cgroups.IoHierarchy("/sys/fs/cgroup/blkio", 1)
    assert cgroups.io_hierarchy([cpu, v2]) == cgroups.IoHierarchy(unified, 2)
    with open(os.path.join(unified, "cgroup.controllers"), "w", encoding="ascii") as fh:
        fh.write("hugetlb\n")  # a hybrid host whose blkio is on v1
    assert cgroups.io_hierarchy([cpu, v2]) is None


def test_io_hierarchy_in_a_container_takes_the_hosts_mounted_over_its_own() -> None:
    # runc's own v1 mount shows only the container's cgroup; the chart's hostPath of the
    # host's /sys/fs/cgroup is mounted over it and listed after it.
    own = _mount("cgroup", "/sys/fs/cgroup/blkio", ("rw", "blkio"), "/kubepods/pod1/ctr")
    host = _mount("cgroup", "/sys/fs/cgroup/blkio", ("rw", "blkio"))
    assert cgroups.io_hierarchy([own]) is None
    assert cgroups.io_hierarchy([own, host]) == cgroups.IoHierarchy("/sys/fs/cgroup/blkio", 1)
    # the other way round the host's is hidden
    assert cgroups.io_hierarchy([host, own]) is None
    # read from a private cgroup namespace, the host's root is above the namespace's
    above = _mount("cgroup", "/sys/fs/cgroup/blkio", ("rw", "blkio"), "/../../..")
    assert cgroups.io_hierarchy([own, above]) == cgroups.IoHierarchy("/sys/fs/cgroup/blkio", 1)


# --- the node's PersistentVolume watch (controller mode -> node) -------------------------------
class FakeView:
    def __init__(self, classes: dict[str, dict[str, str]], pvs: list[dict[str, Any]]) -> None:
        self.classes = classes
        self.pvs = pvs
        self.class_reads: list[str] = []

    def list_volumes(self) -> tuple[list[dict[str, Any]], str]:
        return self.pvs, "1"

    def watch_volumes(self, resource_version: str, seconds: int) -> Iterator[dict[str, Any]]:
        return iter(())

    def class_parameters(self, name: str) -> dict[str, str] | None:
        self.class_reads.append(name)
        return self.classes.get(name)


def _pv(handle: str, vac: str, driver: str = "stowage.csi.io") -> dict[str, Any]:
    return {"spec": {"csi": {"driver": driver, "volumeHandle": handle},
                     "volumeAttributesClassName": vac}}


def test_watch_applies_the_class_csi_resizer_recorded(
    controller: ControllerCore,
    node: NodeCore,
    ctx: PoolContext,
    host: FakeHost,
    staging: str,
    target: str,
) -> None:
    v = make(controller)
    host.pod_cgroups[POD] = 1
    node.publish(v.id, staging, target, RW, False, pod_uid=POD)
    view = FakeView(
        {"slow": {RIOPS: "1000"}, "bad": {RIOPS: "0"}},
        [
            _pv(v.id, "slow"),
            _pv("v-" + "e" * 32, "slow"),  # another node's volume
            _pv(v.id, "slow", driver="other.csi.io"),
            _pv("pvc-not-ours", "slow"),
        ],
    )
    watch = AttributesWatch(node.limits, view)
    assert watch.sync() == "1"
    assert host.io_limits[(POD, DEV)] == IoLimits(read_iops=1000)
    vol = ctx.store.get_volume(v.id)
    assert vol is not None and vol.mutable_parameters == {RIOPS: "1000"}
    assert watch.handle(_pv(v.id, "slow")) and view.class_reads == ["slow"]  # read once
    assert not watch.handle(_pv(v.id, "missing"))
    assert not watch.handle(_pv(v.id, "bad"))  # refused: nothing changes
    vol = ctx.store.get_volume(v.id)
    assert vol is not None and vol.mutable_parameters == {RIOPS: "1000"}


def test_watch_keeps_going_after_api_errors(controller: ControllerCore, node: NodeCore) -> None:
    calls = []

    class Failing(FakeView):
        def list_volumes(self) -> tuple[list[dict[str, Any]], str]:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("connection refused")
            stopping.set()
            return [], "2"

    stopping = threading.Event()
    AttributesWatch(node.limits, Failing({}, []), retry=0.0).run(stopping)
    assert len(calls) == 2


def test_watch_waits_for_a_busy_volume(
    controller: ControllerCore, node: NodeCore, ctx: PoolContext
) -> None:
    v = make(controller)
    view = FakeView({"slow": {RIOPS: "1000"}}, [])
    watch = AttributesWatch(node.limits, view, retry=0.0)
    with ctx.locks.hold(v.id):  # another call holds the volume for the whole retry budget
        assert not watch.handle(_pv(v.id, "slow"))
    assert watch.handle(_pv(v.id, "slow"))
    vol = ctx.store.get_volume(v.id)
    assert vol is not None and vol.mutable_parameters == {RIOPS: "1000"}
