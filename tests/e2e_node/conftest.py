"""The node end-to-end tier (issue 5): `make e2e-node` after `make e2e-tools e2e-node-tools`.

The control-plane tier's session (tests/e2e/cluster.py: etcd, kube-apiserver, the controller
manager, both driver modes, the chart's sidecars) plus a kube-scheduler and a real node: kubelet
and containerd in a network namespace (tests/e2e/node.py), the apiserver reached over the veth.
Stowage is registered with that kubelet through the registrar stand-in (tests/e2e/registrar.py),
so the kubelet itself creates the CSINode entry and the topology label from NodeGetInfo. The
node driver runs in the host mount namespace, as the kubelet does. `make test` and `make e2e`
do not collect this directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kubernetes.client.exceptions import ApiException

from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from tests.e2e.cluster import (
    DRIVER,
    E2E,
    NODE,
    SIDECARS,
    TOPOLOGY_KEY,
    Cluster,
    no_rbac_denials,
    start_node_driver,
    stowage_world,
    wait,
)
from tests.e2e.node import Node
from tests.e2e.registrar import Registrar

__all__ = ["no_rbac_denials"]
NS = "default"


def chart_values(c: Cluster) -> tuple[str, ...]:
    """The controller and snapshot-controller pods stay Pending as in the control-plane tier
    (a nodeSelector no node has); the DaemonSet's pod lands on the node, since it is the node
    sidecars' identity, but cannot start (no image there, pull policy Never) and its hostPath
    directories are this run's, not the machine's /var/lib/kubelet and /var/lib/stowage."""
    never = ("nodeDriverRegistrar", "provisioner", "snapshotter", "livenessProbe")
    return (
        *(
            f"{w}.nodeSelector.stowage-e2e-chart-pods=none"
            for w in ("controller", "snapshotController")
        ),
        f"kubeletDir={os.path.join(node_dir(c), 'kubelet')}",
        f"node.poolDir={c.path('chart-pool-dir')}",
        "image.pullPolicy=Never",
        *(f"sidecars.{s}.image.pullPolicy=Never" for s in never),
    )


def node_dir(c: Cluster) -> str:
    return c.path("kubelet-node")


def free_node_index() -> int:
    """The first 10.231.<i>.0/24 no interface on this host uses (other runs may be up)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for i in range(200):
        if f" 10.231.{i}." not in used:
            return i
    raise RuntimeError("no free 10.231.<i>.0/24 for the node")


@dataclass
class World:
    e: E2E
    node: Node
    registrar: Registrar

    def restart_registrar(self) -> None:
        self.registrar.stop()
        self.registrar = Registrar(
            self.node.kubelet_root, DRIVER, self.e.cluster.node_socket
        ).start()

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
        """Stop the kubelet and the node driver, then what a reboot does (Node.power_off:
        containers, shims, containerd, every mount under the node's directories), detach the
        pool's volume loops; start the driver, its registration and the kubelet again. The
        DaemonSet pod's sidecars go down and come back with the driver, as they would."""
        if self.node.kubelet:
            self.node.kubelet.stop()
        self.e.cluster.procs["driver-node"].stop()
        pod_sidecars = [n for n, (workload, _c) in SIDECARS.items() if workload == "node"]
        for name in pod_sidecars:
            self.e.cluster.procs[name].stop()
        self.node.power_off()
        print(f"  detached {self.detach_pool_loops()}")
        start_node_driver(self.e.cluster)
        for name in pod_sidecars:
            self.e.start_sidecar(name)
        self.node.power_on()
        self.restart_registrar()
        wait(self.registered, 60, "the kubelet to register Stowage again")

    def registered(self) -> bool:
        return self.registrar.notified.is_set() and bool(
            self.registrar.status and self.registrar.status[0]
        )


def _delete_pods(e: E2E) -> None:
    """Let the kubelet unpublish and unstage through the driver before the node goes."""
    with contextlib.suppress(ApiException):
        e.apps.delete_collection_namespaced_stateful_set(NS)
    with contextlib.suppress(ApiException):
        e.core.delete_collection_namespaced_pod(NS, grace_period_seconds=1)
    with contextlib.suppress(AssertionError):
        wait(lambda: not e.core.list_namespaced_pod(NS).items, 60, "the test pods to go")


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    index = free_node_index()
    made: list[World] = []

    def join(e: E2E, stack: contextlib.ExitStack) -> None:
        c = e.cluster
        node = Node(node_dir(c), NODE, c.kubelet_kubeconfig(), index=index)
        stack.callback(_stop_node, node)
        node.start()
        registrar = Registrar(node.kubelet_root, DRIVER, c.node_socket).start()
        w = World(e, node, registrar)
        stack.callback(lambda: w.registrar.stop())
        stack.callback(_delete_pods, e)  # first: the kubelet needs the driver registered
        wait(w.registered, 60, "the kubelet's NotifyRegistrationStatus(registered)")
        wait(lambda: _csinode_driver(e), 60, "the kubelet's CSINode entry for Stowage")
        wait(
            lambda: e.core.read_node(NODE).metadata.labels.get(TOPOLOGY_KEY) == NODE,
            60,
            "the kubelet's topology label from NodeGetInfo",
        )
        wait(lambda: _node_ready(e), 120, f"Node {NODE} Ready")
        made.append(w)

    with stowage_world(join, f"10.231.{index}.1", chart_values):
        yield made[0]


def _stop_node(node: Node) -> None:
    problems = node.stop()
    if problems:
        raise RuntimeError(f"node teardown left: {problems}")


def _csinode_driver(e: E2E) -> object:
    drivers = e.storage.read_csi_node(NODE).spec.drivers or []
    return next((d for d in drivers if d.name == DRIVER), None)


def _node_ready(e: E2E) -> bool:
    conds = e.core.read_node(NODE).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


@pytest.fixture(scope="session")
def e2e(world: World) -> E2E:
    return world.e
