"""Per-volume I/O limits, written into the cgroups of the pod that uses the volume.

Where a pod's I/O to a Stowage volume is charged (measured on this project's test hosts, kernel
6.18, cgroup v1/v2 hybrid with `blkio` on v1; see docs/design.md, "ModifyVolume"): a read or
direct write by a process in the pod is a bio submitted to the volume's loop device by that
process, so blk-throttle charges it to the process's own cgroup, and a limit on the loop
device's `MAJ:MIN` in that cgroup holds. (The loop worker later re-issues it against the
backing file, charged to the same cgroup since loop became cgroup-aware, but that I/O goes to
the pool's disk, another device, which these limits do not name.)

- cgroup v2 (`io` controller in the unified hierarchy): `io.max` is hierarchical, so the limit
  is written once, in the pod's cgroup, and covers every container in it.
- cgroup v1 (`blkio` hierarchy): `blkio.throttle.*` is NOT hierarchical (measured: a limit in
  a parent cgroup or in the root does not slow a process in a child), so the limit is written
  into the pod's cgroup and every cgroup below it (each container's), and again for cgroups
  that appear later (a container started or restarted after the publish) by the node's
  periodic reconciliation. On v1 each container therefore gets the limit on its own.
- Buffered writes reach the device from the kernel's flusher threads, charged to the writer's
  cgroup on v2 only (v1 cannot attribute writeback): on v1 only direct I/O and reads are
  limited.

The pod's cgroup is found by its UID (kubelet passes `csi.storage.k8s.io/pod.uid` with CSIDriver
`podInfoOnMount: true`), in both kubelet layouts: `.../pod<uid>` (cgroupfs driver) and
`...-pod<uid with _>.slice` (systemd driver).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from driver.errors import Internal
from driver.host.mountinfo import MountEntry
from driver.model import IoLimits

log = logging.getLogger(__name__)

#: How deep below the hierarchy's root a pod's cgroup may be (kubepods/burstable/pod<uid> is 3;
#: a kubelet --cgroup-root adds levels).
MAX_POD_DEPTH = 5
_V1_FILES = (
    ("read_iops", "blkio.throttle.read_iops_device"),
    ("write_iops", "blkio.throttle.write_iops_device"),
    ("read_bps", "blkio.throttle.read_bps_device"),
    ("write_bps", "blkio.throttle.write_bps_device"),
)
_V2_KEYS = (("read_iops", "riops"), ("write_iops", "wiops"), ("read_bps", "rbps"),
            ("write_bps", "wbps"))


@dataclass(frozen=True)
class IoHierarchy:
    """The mounted cgroup hierarchy that holds the block I/O controller."""

    root: str
    version: int  # 1: blkio.throttle.*; 2: io.max


def _whole(m: MountEntry) -> bool:
    """The mount shows a whole hierarchy: its root is "/", or, read from inside a private
    cgroup namespace, above that namespace's root ("/../.."), as the host's hierarchy mounted
    into a container's is."""
    return m.root == "/" or m.root.startswith("/..")


def io_hierarchy(mounts: Iterable[MountEntry]) -> IoHierarchy | None:
    """v1 `blkio` if a hierarchy has it (then v2 cannot have `io`), else the unified hierarchy
    if its root offers `io`; None when neither does. Only the last mount at a mount point
    counts: the chart's node container mounts the host's /sys/fs/cgroup over its own cgroup
    mounts (which show only the container's cgroup), and mountinfo lists the host's after."""
    top: dict[str, MountEntry] = {}
    for m in mounts:
        top.pop(m.mount_point, None)  # re-inserted last: mountinfo order is mount order
        top[m.mount_point] = m
    unified: str | None = None
    for m in top.values():
        if not _whole(m):
            continue
        if m.fs_type == "cgroup" and "blkio" in m.super_options:
            return IoHierarchy(m.mount_point, 1)
        if m.fs_type == "cgroup2" and unified is None:
            unified = m.mount_point
    if unified is not None:
        try:
            with open(os.path.join(unified, "cgroup.controllers"), encoding="ascii") as fh:
                if "io" in fh.read().split():
                    return IoHierarchy(unified, 2)
        except OSError:
            pass
    return None


def _is_pod_dir(name: str, uid: str) -> bool:
    return name == f"pod{uid}" or name.endswith(f"pod{uid.replace('-', '_')}.slice")


def pod_cgroups(root: str, uid: str) -> list[str]:
    """The cgroup directories named for pod `uid` within MAX_POD_DEPTH of `root` (normally one)."""
    found: list[str] = []
    base = root.rstrip("/").count("/")
    for dirpath, dirnames, _files in os.walk(root):
        depth = dirpath.rstrip("/").count("/") - base
        keep = []
        for d in dirnames:
            if _is_pod_dir(d, uid):
                found.append(os.path.join(dirpath, d))
            elif depth + 1 < MAX_POD_DEPTH:
                keep.append(d)
        dirnames[:] = keep
    return sorted(found)


def _below(path: str) -> list[str]:
    """`path` and every cgroup below it."""
    return [dirpath for dirpath, _d, _f in os.walk(path)]


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as fh:
            fh.write(text)
    except FileNotFoundError:
        raise  # the cgroup went away (container exited): the caller skips it
    except OSError as exc:
        raise Internal(f"cannot write {text.strip()!r} to {path}: {exc.strerror}") from exc


def _v1(cgroup: str, dev: str, limits: IoLimits) -> None:
    for field, name in _V1_FILES:
        # 0 removes this device's rule; writing it when none exists is accepted too.
        _write(os.path.join(cgroup, name), f"{dev} {getattr(limits, field)}\n")


def _v2(cgroup: str, dev: str, limits: IoLimits) -> None:
    parts = [f"{key}={getattr(limits, field) or 'max'}" for field, key in _V2_KEYS]
    _write(os.path.join(cgroup, "io.max"), f"{dev} {' '.join(parts)}\n")


def apply(hierarchy: IoHierarchy, pod_uid: str, major: int, minor: int, limits: IoLimits) -> int:
    """Write `limits` for device `major:minor` into the cgroups of pod `pod_uid`. Returns how
    many cgroups were written (0 when the pod has no cgroup here: not started yet, or gone)."""
    dev = f"{major}:{minor}"
    written = 0
    for pod in pod_cgroups(hierarchy.root, pod_uid):
        targets = _below(pod) if hierarchy.version == 1 else [pod]
        for cgroup in targets:
            try:
                (_v1 if hierarchy.version == 1 else _v2)(cgroup, dev, limits)
            except FileNotFoundError:
                continue
            written += 1
    return written
