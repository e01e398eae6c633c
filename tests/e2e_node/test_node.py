"""Pods with Stowage volumes on a real kubelet + containerd node (issue 5).

Everything a pod reports it prints as `key=value` lines; they are read from its container log
file in the node's podLogsDir (no exec, no kubelet API). Host-side checks read the mounts the
kubelet made (mountinfo) and the loop devices and images of this run's pool.

The StatefulSet `web` (one replica, an xfs claim from its volumeClaimTemplate) is shared by the
tests in file order: pod re-creation, node reboot, snapshot while it writes, online expansion.
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from tests.e2e.cluster import DRIVER, E2E, NODE, SNAP_GROUP, SNAP_VERSION, TOPOLOGY_KEY, wait
from tests.e2e.node import BUSYBOX_IMAGE
from tests.e2e_node.conftest import NS, World, read_text

STS, CLAIM = "web", "data-web-0"
STS_CREATED: dict[str, float] = {}  # monotonic time the StatefulSet (and so its claim) was made
STS_SIZE, STS_GROWN = "320Mi", "640Mi"  # xfs: mkfs.xfs wants 300 MiB; ext4 growth online
# needs CAP_SYS_RESOURCE, which this machine's sandbox does not grant

# The StatefulSet's container: 8 MiB of random bytes written once (fsync'ed, then renamed),
# their digest and the device number of /data printed at every start, then a journal appended
# five times a second (the writes a snapshot is taken under) and the filesystem size printed
# whenever it changes.
WRITER = """
cd /data
if [ -f blob ]; then echo state=existing; else
  head -c 8388608 /dev/urandom > blob.tmp && sync && mv blob.tmp blob && sync && echo state=new
fi
echo sum=$(sha256sum blob | cut -d' ' -f1)
echo dev=$(stat -c %d /data)
last=; i=0
while true; do
  s=$(df -k /data | awk 'NR==2 {print $2}')
  if [ "$s" != "$last" ]; then echo size=$s; last=$s; fi
  echo "$i" >> journal; i=$((i+1))
  sleep 0.2
done
"""


# --- helpers ------------------------------------------------------------------------------------
def container(script: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "main",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", script],
        **extra,
    }


def pod_spec(ctr: dict[str, Any], volumes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [ctr],
        "volumes": volumes,
        **extra,
    }


def claim_volume(claim: str, read_only: bool = False) -> dict[str, Any]:
    return {"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def make_pod(e: E2E, name: str, spec: dict[str, Any]) -> None:
    e.core.create_namespaced_pod(
        NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    )


def phase(e: E2E, pod: str) -> str:
    return str(e.core.read_namespaced_pod(pod, NS).status.phase)


def finished(e: E2E, pod: str, timeout: float = 120) -> None:
    got = wait(lambda: phase(e, pod) in ("Succeeded", "Failed") and phase(e, pod), timeout,
               f"pod {pod} to finish")  # fmt: skip
    assert got == "Succeeded", f"pod {pod}: {got}"


def log_files(w: World, pod: str) -> list[str]:
    uid = w.e.core.read_namespaced_pod(pod, NS).metadata.uid
    d = os.path.join(w.node.pod_logs_dir, f"{NS}_{pod}_{uid}", "main")
    return sorted(glob.glob(os.path.join(d, "*.log")), key=os.path.getmtime)


def report(path: str) -> dict[str, str]:
    """key=value lines of one container log (CRI format: time stream tag content)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(" ", 3)
            if len(parts) == 4 and "=" in parts[3]:
                k, v = parts[3].split("=", 1)
                out[k] = v
    return out


def latest(w: World, pod: str, *keys: str, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """The report of the pod's newest container log not in `exclude`, once it has `keys`."""
    files = [f for f in log_files(w, pod) if f not in exclude]
    if not files:
        return {}
    got = report(files[-1])
    return got if all(k in got for k in keys) else {}


def pv_of(e: E2E, claim: str) -> client.V1PersistentVolume:
    name = e.core.read_namespaced_persistent_volume_claim(claim, NS).spec.volume_name
    pv = e.core.read_persistent_volume(name)
    assert pv.spec.csi.driver == DRIVER
    return pv


def image_of(w: World, pv: client.V1PersistentVolume) -> str:
    return os.path.join(w.e.cluster.pool_dir, "volumes", pv.spec.csi.volume_handle + ".img")


def loop_rdev(w: World, pv: client.V1PersistentVolume) -> int:
    """The device number of the one loop device backing the PV's image."""
    found = LoopManager(SubprocessRunner()).find(image_of(w, pv))
    assert len(found) == 1, f"loops for {pv.spec.csi.volume_handle}: {found}"
    return os.stat(found[0].device).st_rdev


def pod_mount(w: World, pod: str, pv: client.V1PersistentVolume) -> mountinfo.MountEntry:
    """The kubelet's publish target of the PV for the pod, as mounted on the host."""
    uid = w.e.core.read_namespaced_pod(pod, NS).metadata.uid
    target = os.path.join(
        w.node.kubelet_root, "pods", uid, "volumes", "kubernetes.io~csi", pv.metadata.name, "mount"
    )
    top = mountinfo.top_mount_at(target)
    assert top is not None, f"nothing mounted at {target}"
    return top


def delete_pod(e: E2E, pod: str) -> None:
    e.core.delete_namespaced_pod(pod, NS, grace_period_seconds=1)
    wait(lambda: not [p for p in e.core.list_namespaced_pod(NS).items if p.metadata.name == pod],
         60, f"pod {pod} deleted")  # fmt: skip


def delete_claim(e: E2E, claim: str, delete_pv: bool = False) -> None:
    pv = e.core.read_namespaced_persistent_volume_claim(claim, NS).spec.volume_name
    e.core.delete_namespaced_persistent_volume_claim(claim, NS)
    if delete_pv:  # Retain class
        wait(lambda: e.core.read_persistent_volume(pv).status.phase == "Released", 60,
             f"PV {pv} Released")  # fmt: skip
        e.core.delete_persistent_volume(pv)


def sts_ready(w: World, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    def up() -> dict[str, str]:
        if phase(w.e, "web-0") != "Running":
            return {}
        return latest(w, "web-0", "sum", "dev", "size", exclude=exclude)

    return dict(wait(up, 180, "web-0 running and reporting its data"))


@pytest.fixture(scope="module")
def sts(world: World) -> Iterator[World]:
    e = world.e
    STS_CREATED[STS] = time.monotonic()
    e.apps.create_namespaced_stateful_set(
        NS,
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": STS},
            "spec": {
                "serviceName": STS,
                "replicas": 1,
                "selector": {"matchLabels": {"app": STS}},
                "template": {
                    "metadata": {"labels": {"app": STS}},
                    "spec": pod_spec(
                        container(WRITER, volumeMounts=[{"name": "data", "mountPath": "/data"}]),
                        [],
                    ),
                },
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "data"},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "storageClassName": "stowage-xfs",
                            "resources": {"requests": {"storage": STS_SIZE}},
                        },
                    }
                ],
            },
        },
    )
    yield world


# --- tests --------------------------------------------------------------------------------------
def test_the_kubelet_registered_stowage_from_node_get_info(world: World) -> None:
    e = world.e
    pod = world.node_pod()
    assert pod.spec.node_name == NODE
    statuses = {c.name: c for c in pod.status.container_statuses}
    # the registrar stand-in's liveness probe (kubelet-registration-probe) passes
    assert statuses["node-driver-registrar"].ready, statuses["node-driver-registrar"]
    assert all(c.ready for c in statuses.values()), statuses
    entry = next(d for d in e.storage.read_csi_node(NODE).spec.drivers if d.name == DRIVER)
    assert entry.node_id == NODE  # NodeGetInfo's node_id, written by the kubelet
    assert entry.topology_keys == [TOPOLOGY_KEY]
    node = e.core.read_node(NODE)
    assert node.metadata.labels[TOPOLOGY_KEY] == NODE
    assert DRIVER in node.metadata.annotations["csi.volume.kubernetes.io/nodeid"]


def test_statefulset_pod_recreated_reads_the_same_bytes(sts: World) -> None:
    e = sts.e
    wait(lambda: phase(e, "web-0") == "Running", 180, "web-0 Running")
    print(f"  pod start: {time.monotonic() - STS_CREATED[STS]:.1f} s from the new claim to Running")
    first = sts_ready(sts)
    assert first["state"] == "new"
    uid = e.core.read_namespaced_pod("web-0", NS).metadata.uid
    pv = pv_of(e, CLAIM)
    assert (
        int(first["dev"]) == loop_rdev(sts, pv) == os.makedev(*_majmin(pod_mount(sts, "web-0", pv)))
    )
    with open(os.path.join(_target(sts, "web-0", pv), "blob"), "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == first["sum"]  # as the host sees it
    e.core.delete_namespaced_pod("web-0", NS, grace_period_seconds=1)
    wait(lambda: e.core.read_namespaced_pod("web-0", NS).metadata.uid != uid, 60,
         "the StatefulSet to recreate web-0")  # fmt: skip
    second = sts_ready(sts)
    assert second["state"] == "existing"
    assert second["sum"] == first["sum"]


def _majmin(entry: mountinfo.MountEntry) -> tuple[int, int]:
    return entry.major, entry.minor


def _target(w: World, pod: str, pv: client.V1PersistentVolume) -> str:
    return pod_mount(w, pod, pv).mount_point


def test_block_volume_raw_bytes_written_and_read_back(world: World) -> None:
    e = world.e
    e.create_claim("raw", "32Mi", "stowage-block", block=True, namespace=NS)
    script = (
        "head -c 1048576 /dev/urandom > /tmp/x"
        " && dd if=/tmp/x of=/dev/xvda bs=1048576 count=1 conv=fsync 2>/dev/null"
        " && echo wrote=$(sha256sum /tmp/x | cut -d' ' -f1)"
        " && echo read=$(dd if=/dev/xvda bs=1048576 count=1 2>/dev/null | sha256sum"
        " | cut -d' ' -f1)"
        " && echo size=$(blockdev --getsize64 /dev/xvda)"
    )
    ctr = container(script, volumeDevices=[{"name": "data", "devicePath": "/dev/xvda"}])
    make_pod(e, "raw", pod_spec(ctr, [claim_volume("raw")], restartPolicy="Never"))
    finished(e, "raw")
    got = latest(world, "raw", "wrote", "read", "size")
    assert got["wrote"] == got["read"], got
    assert int(got["size"]) == 32 << 20
    pv = pv_of(e, "raw")
    with open(image_of(world, pv), "rb") as fh:  # the bytes reached the image in the pool
        assert hashlib.sha256(fh.read(1 << 20)).hexdigest() == got["wrote"]
    delete_pod(e, "raw")
    delete_claim(e, "raw", delete_pv=True)  # stowage-block is Retain


def test_fs_group_owns_new_files_and_read_only_mounts_refuse_writes(world: World) -> None:
    e = world.e
    e.create_claim("shared", "64Mi", "stowage", namespace=NS)
    mount = [{"name": "data", "mountPath": "/data"}]
    writer = container(
        "echo hello > /data/f && echo gid=$(stat -c %g /data/f) && echo uid=$(stat -c %u /data/f)"
        " && echo dirgid=$(stat -c %g /data)",
        volumeMounts=mount,
    )
    ctx = {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000}
    make_pod(e, "owner", pod_spec(writer, [claim_volume("shared")], restartPolicy="Never",
                                  securityContext=ctx))  # fmt: skip
    finished(e, "owner")
    got = latest(world, "owner", "gid")
    assert got == {"gid": "2000", "uid": "1000", "dirgid": "2000"}, got
    reader = container(
        "echo content=$(cat /data/f)"
        " && if touch /data/g 2>/tmp/err; then echo write=allowed; else echo write=refused;"
        " echo err=$(cat /tmp/err); fi",
        volumeMounts=mount,
    )
    make_pod(e, "reader", pod_spec(reader, [claim_volume("shared", read_only=True)],
                                   restartPolicy="Never"))  # fmt: skip
    finished(e, "reader")
    got = latest(world, "reader", "write")
    assert got["content"] == "hello"
    assert got["write"] == "refused", got
    assert "Read-only file system" in got["err"], got
    for pod in ("owner", "reader"):
        delete_pod(e, pod)
    delete_claim(e, "shared")


def test_node_reboot_keeps_the_data_on_the_right_device(sts: World) -> None:
    e = sts.e
    before = sts_ready(sts)
    old_logs = tuple(log_files(sts, "web-0"))
    uid = e.core.read_namespaced_pod("web-0", NS).metadata.uid
    vid = pv_of(e, CLAIM).spec.csi.volume_handle
    old_driver_logs = set(sts.driver_log_files())
    sts.reboot()
    after = sts_ready(sts, exclude=old_logs)
    since = "".join(read_text(f) for f in sts.driver_log_files() if f not in old_driver_logs)
    for step in ("staged", "published"):  # by the restarted kubelet, on the restarted driver
        assert f"{step} {vid}" in since, step
    assert e.core.read_namespaced_pod("web-0", NS).metadata.uid == uid  # restarted, not recreated
    assert after["state"] == "existing"
    assert after["sum"] == before["sum"]
    pv = pv_of(e, CLAIM)
    rdev = loop_rdev(sts, pv)  # a loop attached after the reboot, backing this PV's image
    assert int(after["dev"]) == rdev
    assert os.makedev(*_majmin(pod_mount(sts, "web-0", pv))) == rdev


def test_snapshot_while_the_pod_writes_restores_into_a_second_pod(sts: World) -> None:
    e = sts.e
    state = sts_ready(sts)
    name = f"snap-{uuid.uuid4().hex[:6]}"
    e.snapshot(name, CLAIM, NS)
    assert phase(e, "web-0") == "Running"  # it kept writing
    source = {"apiGroup": SNAP_GROUP, "kind": "VolumeSnapshot", "name": name}
    e.create_claim("restored", STS_SIZE, "stowage-xfs", source=source, namespace=NS)
    reader = container(
        "echo sum=$(sha256sum /data/blob | cut -d' ' -f1) && echo lines=$(wc -l < /data/journal)",
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
    )
    make_pod(e, "restored", pod_spec(reader, [claim_volume("restored")], restartPolicy="Never"))
    finished(e, "restored")
    got = latest(sts, "restored", "sum")
    assert got["sum"] == state["sum"], got
    journal = os.path.join(_target(sts, "web-0", pv_of(e, CLAIM)), "journal")
    with open(journal, encoding="ascii") as fh:  # the live volume, as the host sees it
        live = len(fh.read().splitlines())
    assert 0 < int(got["lines"]) < live, (got, live)  # a copy from the middle of the writes
    delete_pod(e, "restored")
    delete_claim(e, "restored")
    e.custom.delete_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, NS, "volumesnapshots", name)


def test_expansion_while_the_pod_runs_is_seen_by_the_pod(sts: World) -> None:
    e = sts.e
    before = int(sts_ready(sts)["size"])
    e.core.patch_namespaced_persistent_volume_claim(
        CLAIM, NS, {"spec": {"resources": {"requests": {"storage": STS_GROWN}}}}
    )

    def grown() -> int:
        files = log_files(sts, "web-0")
        sizes = [int(ln.split("size=", 1)[1]) for ln in _lines(files[-1]) if "size=" in ln]
        return sizes[-1] if sizes and sizes[-1] > before + (250 << 10) else 0

    after = wait(grown, 120, "the pod to see the grown filesystem (df)")
    print(f"  filesystem {before} KiB -> {after} KiB inside the pod")
    claim = wait(
        lambda: (
            (c := e.core.read_namespaced_persistent_volume_claim(CLAIM, NS)).status.capacity[
                "storage"
            ]
            == STS_GROWN
            and c
        ),
        60,
        f"PVC status capacity {STS_GROWN}",
    )
    assert not [c for c in claim.status.conditions or [] if c.type.startswith("FileSystemResize")]
    assert phase(e, "web-0") == "Running"


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read().splitlines()


# --- ModifyVolume: a claim's VolumeAttributesClass changed on a running pod (issue 18) ----------
# fio is not in the test image (busybox); the pod measures with busybox dd instead, reading 4 KiB
# blocks with O_DIRECT (iflag=direct) from its raw block device, timed by /proc/uptime (the
# host's clock, 10 ms steps; a sample at the limits used lasts 2-5 s).
READS = 2000
READER = f"""
while true; do
  read a _ < /proc/uptime
  dd if=/dev/xvda of=/dev/null bs=4096 count={READS} iflag=direct 2>/dev/null
  read b _ < /proc/uptime
  echo "sample=$a,$b"
done
"""
CLASSES = {"e2e-iops-1000": 1000, "e2e-iops-400": 400}


def _uptime() -> float:
    with open("/proc/uptime", encoding="ascii") as fh:
        return float(fh.read().split()[0])


def _samples(w: World, pod: str, after: float) -> list[float]:
    """IOPS of the pod's samples that started after host uptime `after`."""
    out = []
    for line in _lines(log_files(w, pod)[-1]):
        if "sample=" in line:
            a, b = (float(x) for x in line.split("sample=", 1)[1].split(","))
            if a > after and b > a:
                out.append(READS / (b - a))
    return out


def _pod_limit(w: World, pod: str) -> str:
    """What the pod's container cgroups hold for reads (cgroup v1 blkio or v2 io.max)."""
    from driver.host import cgroups

    uid = w.e.core.read_namespaced_pod(pod, NS).metadata.uid
    hierarchy = cgroups.io_hierarchy(mountinfo.read())
    assert hierarchy is not None, "no block I/O cgroup controller on this host"
    name = "blkio.throttle.read_iops_device" if hierarchy.version == 1 else "io.max"
    text = []
    for pod_dir in cgroups.pod_cgroups(hierarchy.root, uid):
        for d, _dirs, files in os.walk(pod_dir):
            if name in files:
                with open(os.path.join(d, name), encoding="ascii") as fh:
                    text.append(fh.read())
    return "".join(text)


def test_volume_attributes_class_changed_on_a_running_pod_limits_its_io(world: World) -> None:
    e = world.e
    for name, iops in CLASSES.items():
        e.storage.create_volume_attributes_class(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "VolumeAttributesClass",
                "metadata": {"name": name},
                "driverName": DRIVER,
                "parameters": {"stowage.csi.io/read-iops": str(iops)},
            }
        )
    e.create_claim("limited", "32Mi", "stowage-block", block=True, namespace=NS)
    ctr = container(READER, volumeDevices=[{"name": "data", "devicePath": "/dev/xvda"}])
    make_pod(e, "limited", pod_spec(ctr, [claim_volume("limited")]))
    try:
        wait(lambda: phase(e, "limited") == "Running" and _samples(world, "limited", 0), 180,
             "the pod's first unlimited sample")  # fmt: skip
        print(f"  unlimited: {max(_samples(world, 'limited', 0)):.0f} IOPS (dd, O_DIRECT)")
        for name, iops in CLASSES.items():
            e.core.patch_namespaced_persistent_volume_claim(
                "limited", NS, {"spec": {"volumeAttributesClassName": name}}
            )
            wait(
                lambda n=name: (
                    e.core.read_namespaced_persistent_volume_claim("limited", NS)
                    .status.current_volume_attributes_class_name == n
                ),
                120,
                f"csi-resizer to record {name} on the claim",
            )
            wait(lambda i=iops: {str(i), f"riops={i}"} & set(_pod_limit(world, "limited").split()),
                 60, f"the node to write {iops} IOPS into the pod's cgroups")  # fmt: skip
            applied = _uptime()
            got = wait(lambda a=applied: _samples(world, "limited", a)[:2] if len(
                _samples(world, "limited", a)) >= 2 else [], 120, "two samples under the limit")
            print(f"  {name}: {', '.join(f'{x:.0f}' for x in got)} IOPS inside the pod")
            for measured in got:
                assert abs(measured - iops) <= 0.15 * iops, (
                    f"{measured:.0f} IOPS under a {iops} IOPS class"
                )
        assert phase(e, "limited") == "Running"
    finally:
        delete_pod(e, "limited")
        delete_claim(e, "limited", delete_pv=True)  # stowage-block is Retain
        for name in CLASSES:
            e.storage.delete_volume_attributes_class(name)
