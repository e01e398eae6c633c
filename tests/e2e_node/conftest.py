"""The node end-to-end tier (issue 5, issue 17): `make e2e-node` after `make e2e-tools
e2e-node-tools e2e-images`.

The control plane of the control-plane tier (tests/e2e/cluster.py: etcd, kube-apiserver, the
controller manager) plus a kube-scheduler and a real node: kubelet, kube-proxy and containerd in
a network namespace (tests/e2e/node.py), the apiserver reached over the veth. The images made
by `make e2e-images` (Stowage's own, the Go-built sidecars, the registrar and livenessprobe
stand-ins) are imported into the node's containerd, then Stowage is installed with the real
`helm install` of charts/stowage: the node DaemonSet pod, the controller Deployment pod and the
snapshot-controller run under the kubelet, reach the apiserver through the `kubernetes` Service
(kube-proxy) with their ServiceAccount tokens, and the registrar stand-in registers the driver
with the kubelet, which writes the CSINode entry and the topology label from NodeGetInfo.
Nothing of Stowage runs as a host process. `make test` and `make e2e` do not collect this
directory."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from tests.conftest import make_pool
from tests.e2e.cluster import (
    DRIVER,
    E2E,
    NAMESPACE,
    NODE,
    RELEASE,
    TOPOLOGY_KEY,
    Cluster,
    kubeconfig,
    wait,
)
from tests.e2e.node import Node, run
from tests.e2e.procs import REPO

NS = "default"
CHART = os.path.join(REPO, "charts", "stowage")
IMAGES = os.path.expanduser(os.environ.get("STOWAGE_E2E_IMAGES_DIR", "~/.cache/stowage/e2e/images"))
# Chart value → the image file `make e2e-images` wrote (its reference is in <file>.ref).
CHART_IMAGES = {
    "image": "stowage-csi",
    "sidecars.nodeDriverRegistrar.image": "csi-node-driver-registrar-standin",
    "sidecars.provisioner.image": "csi-provisioner",
    "sidecars.snapshotter.image": "csi-snapshotter",
    "sidecars.resizer.image": "csi-resizer",  # v2.2.0: the module proxy has no v2.2.1
    "sidecars.livenessProbe.image": "livenessprobe-standin",
    "snapshotController.image": "snapshot-controller",
}
# The examples' image (deploy/examples/*.yaml), tagged onto the node's busybox.
EXAMPLES_BUSYBOX = "docker.io/library/busybox:1.36"
DENIED = re.compile(r"is forbidden|forbidden: User", re.IGNORECASE)


def image_ref(name: str) -> tuple[str, str]:
    """(repository, tag) of an image `make e2e-images` made."""
    path = os.path.join(IMAGES, f"{name}.ref")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: run make e2e-images")
    with open(path, encoding="utf-8") as fh:
        ref = fh.read().strip()
    repo, _, tag = ref.rpartition(":")
    return repo, tag


def chart_values(node: Node, pool_dir: str, **extra: str) -> list[str]:
    """The test's `--set` values: the images imported on the node (never pulled), this run's
    kubelet directory and pool; everything else is the chart's default."""
    out = []
    for key, name in CHART_IMAGES.items():
        repo, tag = image_ref(name)
        out += [f"{key}.repository={repo}", f"{key}.tag={tag}", f"{key}.pullPolicy=Never"]
    out += [f"kubeletDir={node.kubelet_root}", f"node.poolDir={pool_dir}", "logLevel=debug"]
    out += [f"{k}={v}" for k, v in extra.items()]
    return out


class ChartCluster(Cluster):
    @property
    def node_socket(self) -> str:  # the DaemonSet's socket-dir hostPath
        return os.path.join(self.path("kubelet-node", "kubelet"), "plugins", DRIVER, "csi.sock")


@dataclass
class World:
    e: E2E
    node: Node
    helm_bin: str
    kubectl_bin: str
    values: list[str]
    marks: dict[str, int] = field(default_factory=dict)

    # --- tools ----------------------------------------------------------------------------
    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [self.helm_bin, *args, "--kubeconfig", self.e.cluster.admin_kubeconfig()]
        print(f"  $ helm {' '.join(args[:3])} …")
        return run(*argv, check=check)

    def install(self, *extra: str) -> None:
        sets = [a for v in [*self.values, *extra] for a in ("--set", v)]
        # --wait: the snapshot classes are post-install hooks, and helm maps a hook's kind only
        # when it runs it; without --wait that can be before the apiserver serves the CRDs the
        # same release just created ("no matches for kind VolumeGroupSnapshotClass", 1 in 3
        # installs here). --wait also waits for every CRD to be Established first.
        self.helm(
            "install", RELEASE, CHART, "-n", NAMESPACE, "--create-namespace", "--wait", *sets
        )

    def upgrade(self, *extra: str) -> None:
        sets = [a for v in [*self.values, *extra] for a in ("--set", v)]
        self.helm("upgrade", RELEASE, CHART, "-n", NAMESPACE, *sets)

    def kubectl(self, *args: str, check: bool = True) -> str:
        argv = [self.kubectl_bin, "--kubeconfig", self.e.cluster.admin_kubeconfig(), *args]
        p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        if check and p.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} -> {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    # --- the chart's pods -----------------------------------------------------------------
    def pods(self, component: str) -> list[client.V1Pod]:
        sel = f"app.kubernetes.io/component={component}"
        return list(self.e.core.list_namespaced_pod(NAMESPACE, label_selector=sel).items)

    def node_pod(self) -> client.V1Pod:
        pods = [p for p in self.pods("node") if not p.metadata.deletion_timestamp]
        assert len(pods) == 1, [p.metadata.name for p in pods]
        return pods[0]

    def ready(self, component: str) -> bool:
        pods = [p for p in self.pods(component) if not p.metadata.deletion_timestamp]
        return bool(pods) and all(_pod_ready(p) for p in pods)

    def wait_ready(self, timeout: float = 240) -> None:
        for component in ("node", "controller", "snapshot-controller"):
            try:
                wait(lambda c=component: self.ready(c), timeout, f"the chart's {component} Ready")
            except TimeoutError:
                print(self.describe())
                raise

    def describe(self) -> str:
        """The chart pods' container states and log tails, for a failure message."""
        out = []
        for p in self.e.core.list_namespaced_pod(NAMESPACE).items:
            out.append(f"pod {p.metadata.name} {p.status.phase} on {p.spec.node_name}")
            for cs in p.status.container_statuses or []:
                out.append(f"  {cs.name} ready={cs.ready} restarts={cs.restart_count} {cs.state}")
            for f in self.log_files(p.metadata.name):
                with open(f, encoding="utf-8", errors="replace") as fh:
                    tail = fh.read().splitlines()[-8:]
                out += [f"  {os.path.relpath(f, self.node.pod_logs_dir)}:", *tail]
        return "\n".join(out)

    def log_files(self, pod: str, container: str = "*", namespace: str = NAMESPACE) -> list[str]:
        """The pod's container log files (every restart), oldest first."""
        pattern = os.path.join(self.node.pod_logs_dir, f"{namespace}_{pod}_*", container, "*.log")
        return sorted(glob.glob(pattern), key=os.path.getmtime)

    def driver_log_files(self) -> list[str]:
        return self.log_files(self.node_pod().metadata.name, "stowage-csi")

    def denied_lines(self) -> list[str]:
        """Lines where a chart container was refused by RBAC since the last call."""
        found = []
        pattern = os.path.join(self.node.pod_logs_dir, f"{NAMESPACE}_*", "*", "*.log")
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8", errors="replace") as fh:
                fh.seek(self.marks.get(path, 0))
                text = fh.read()
                self.marks[path] = fh.tell()
            where = os.path.relpath(path, self.node.pod_logs_dir)
            found += [f"{where}: {ln}" for ln in text.splitlines() if DENIED.search(ln)]
        return found

    # --- the node -------------------------------------------------------------------------
    def registered(self) -> bool:
        return bool(_csinode_driver(self.e)) and self.ready("node")

    def detach_pool_loops(self) -> list[str]:
        """Detach the loop devices backing images of this run's pool (only those)."""
        loops = LoopManager(SubprocessRunner())
        prefix = self.e.cluster.pool_dir + os.sep
        gone = []
        for lo in loops.devices():
            if lo.backing_file.startswith(prefix):
                loops.detach(lo.device)
                gone.append(lo.device)
        return gone

    def reboot(self) -> None:
        """What a reboot does (Node.power_off: the kubelet, kube-proxy, every container — the
        chart's pods too —, the shims, containerd, every mount under the node's directories),
        the pool's volume loops detached; then containerd, the kubelet and kube-proxy start
        again and the kubelet restarts the DaemonSet's pod, which registers Stowage again."""
        self.node.power_off()
        print(f"  detached {self.detach_pool_loops()}")
        self.node.power_on()
        wait(self.registered, 180, "the DaemonSet pod Ready and Stowage registered again")


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _pod_ready(p: client.V1Pod) -> bool:
    conds = p.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def _csinode_driver(e: E2E) -> object:
    with contextlib.suppress(ApiException):
        drivers = e.storage.read_csi_node(NODE).spec.drivers or []
        return next((d for d in drivers if d.name == DRIVER), None)
    return None


def _node_ready(e: E2E) -> bool:
    conds = e.core.read_node(NODE).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def free_node_index() -> int:
    """The first 10.231.<i>.0/24 no interface on this host uses (other runs may be up)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for i in range(200):
        if f" 10.231.{i}." not in used:
            return i
    raise RuntimeError("no free 10.231.<i>.0/24 for the node")


def node_images() -> tuple[str, ...]:
    """pause and busybox (tests/e2e/tools/build-node.sh) and every `make e2e-images` image."""
    files = [os.path.join(IMAGES, f"{n}.oci.tar") for n in sorted(set(CHART_IMAGES.values()))]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f} missing: run make e2e-images")
    return ("pause.tar", "busybox.tar", *files)


def delete_test_objects(w: World) -> None:
    """Let the kubelet unpublish and unstage through the driver, and the driver delete the
    volumes, before the node goes."""
    e = w.e
    with contextlib.suppress(ApiException):
        e.apps.delete_collection_namespaced_stateful_set(NS)
    with contextlib.suppress(ApiException):
        e.core.delete_collection_namespaced_pod(NS, grace_period_seconds=1)
    with contextlib.suppress(AssertionError, TimeoutError):
        wait(lambda: not e.core.list_namespaced_pod(NS).items, 90, "the test pods to go")


@contextlib.contextmanager
def chart_world() -> Iterator[World]:
    """A pool (made shared, for the DaemonSet's Bidirectional pool mount), the control plane,
    the node with the images, `helm install`, every chart pod Ready and Stowage registered.
    Torn down even on failure: test pods first (while the driver runs), then the node (its
    processes and pods by PID and cgroup, its mounts), the control plane, the pool."""
    index = free_node_index()
    pool, teardown = make_pool("xfs", 64 << 30)
    started = time.monotonic()
    cluster = ChartCluster(
        pool.base, os.environ["STOWAGE_E2E_BIN"], os.environ["STOWAGE_HELM"], pool.mount,
        node_address=f"10.231.{index}.1",
    )  # fmt: skip
    bin_dir = os.environ.get("STOWAGE_E2E_NODE_BIN", "")
    with contextlib.ExitStack() as stack:
        stack.callback(teardown)
        stack.callback(lambda: print("\n--- e2e logs kept until teardown in", cluster.path("logs")))
        stack.callback(cluster.stop_all)
        run("mount", "--make-shared", pool.mount)
        cluster.start_control_plane()
        api = config.new_client_from_config(config_file=cluster.admin_kubeconfig())
        e = E2E(cluster, api)
        stack.callback(e.node.close)
        certs = lambda n: cluster.path("pki", n)  # noqa: E731
        proxy_kc = kubeconfig(
            cluster.path("kube-proxy.kubeconfig"),
            f"https://{cluster.node_address}:{cluster.api_port}",
            certs("ca.crt"),
            {"client-certificate": certs("admin.crt"), "client-key": certs("admin.key")},
        )
        node_kw: dict[str, Any] = {"bin_dir": bin_dir} if bin_dir else {}
        node = Node(
            cluster.path("kubelet-node"), NODE, cluster.kubelet_kubeconfig(), index=index,
            images=node_images(), proxy_kubeconfig=proxy_kc, client_ca_file=certs("ca.crt"),
            **node_kw,
        )  # fmt: skip
        stack.callback(_stop_node, node)
        node.start()
        node._ctr("images", "tag", "--force", "registry.local/busybox:stowage", EXAMPLES_BUSYBOX)
        w = World(
            e, node, cluster.helm, os.path.join(node.bin_dir, "kubectl"),
            chart_values(node, pool.mount),
        )  # fmt: skip
        stack.callback(delete_test_objects, w)
        wait(lambda: _node_ready(e), 120, f"Node {NODE} Ready")
        w.install()
        e.dyn = dynamic.DynamicClient(api)  # discovery with the snapshot CRDs
        w.wait_ready()
        wait(lambda: _csinode_driver(e), 60, "the kubelet's CSINode entry for Stowage")
        wait(
            lambda: e.core.read_node(NODE).metadata.labels.get(TOPOLOGY_KEY) == NODE,
            60,
            "the kubelet's topology label from NodeGetInfo",
        )
        print(f"  chart installed, every pod Ready {time.monotonic() - started:.1f}s after start")
        yield w


def _stop_node(node: Node) -> None:
    problems = node.stop()
    if problems:
        raise RuntimeError(f"node teardown left: {problems}")


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    with chart_world() as w:
        yield w


@pytest.fixture(scope="session")
def e2e(world: World) -> E2E:
    return world.e


@pytest.fixture(autouse=True)
def no_rbac_denials(world: World) -> Iterator[None]:
    """Any chart container refused by RBAC during a test fails that test."""
    world.denied_lines()  # mark
    yield
    denied = world.denied_lines()
    assert not denied, "a chart container was denied by RBAC:\n" + "\n".join(denied[:20])
