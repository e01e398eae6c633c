"""The control-plane end-to-end tier (issue 4): `make e2e` after `make e2e-tools`.

One control plane (etcd, kube-apiserver, kube-controller-manager), one node-mode driver, one
controller-mode driver and the chart's sidecars, each sidecar authenticating with a token of its
chart ServiceAccount, for the whole session; torn down (processes by PID, mounts, loops, files)
even when something fails. `make test` does not collect this directory (no tools there)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config, dynamic

from driver.ctl.client import Client
from tests.conftest import make_pool
from tests.e2e.cluster import (
    NAMESPACE,
    NODE,
    Cluster,
    driver_argv,
    kubeconfig,
    sidecar_argv,
    sidecar_env,
    wait,
)

DRIVER = "stowage.csi.io"
TOPOLOGY_KEY = "topology.stowage.csi.io/node"
# Sidecar → (chart workload, container). Each runs as its workload's ServiceAccount.
SIDECARS = {
    "csi-provisioner": ("node", "csi-provisioner"),
    "csi-snapshotter": ("node", "csi-snapshotter"),
    "csi-attacher": ("controller", "csi-attacher"),
    "csi-resizer": ("controller", "csi-resizer"),
    "snapshot-controller": ("snapshot-controller", "snapshot-controller"),
}
DENIED = re.compile(r"is forbidden|forbidden: User", re.IGNORECASE)


class E2E:
    """What tests get: the cluster, API clients and a CSI client on the node socket."""

    def __init__(self, cluster: Cluster, api: client.ApiClient) -> None:
        self.cluster = cluster
        self.api = api
        self.core = client.CoreV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.dyn = dynamic.DynamicClient(api)
        self.node = Client("unix://" + cluster.node_socket, timeout=120)
        self.log_marks: dict[str, int] = {}

    def token(self, service_account: str, namespace: str = NAMESPACE) -> str:
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=7200)
        )
        resp = self.core.create_namespaced_service_account_token(service_account, namespace, req)
        return str(resp.status.token)

    def sa_kubeconfig(self, service_account: str, namespace: str = NAMESPACE) -> str:
        path = self.cluster.path(f"{namespace}-{service_account}.kubeconfig")
        return kubeconfig(
            path,
            self.cluster.server,
            self.cluster.path("pki", "ca.crt"),
            {"token": self.token(service_account, namespace)},
        )

    def start_sidecar(self, name: str, kubeconfig_path: str = "", proc_name: str = "") -> None:
        c = self.cluster
        workload, container_name = SIDECARS[name]
        ctr = c.container(workload, container_name)
        kc = kubeconfig_path or self.sa_kubeconfig(c.service_account(workload))
        sock = c.controller_socket if workload == "controller" else c.node_socket
        pod = self.pod_of(workload)
        env = sidecar_env(
            ctr,
            {
                "spec.nodeName": NODE,
                "metadata.name": pod,
                "metadata.namespace": NAMESPACE,
            },
        )
        c.run(
            proc_name or name,
            sidecar_argv(ctr, os.path.join(c.bin_dir, name), sock, kc),
            env=env,
        )

    def pod_of(self, workload: str) -> str:
        """The Pending pod the chart's DaemonSet/Deployment made (the sidecar's identity)."""
        pods = self.core.list_namespaced_pod(NAMESPACE).items
        for p in pods:
            if p.metadata.name.startswith(f"stw-stowage-{workload}-"):
                if workload == "controller" and "snapshot" in p.metadata.name:
                    continue
                return str(p.metadata.name)
        return ""

    def denied_lines(self) -> list[str]:
        """Lines where a sidecar was refused by RBAC since the last call."""
        found = []
        for name in SIDECARS:
            proc = self.cluster.procs.get(name)
            if proc is None:
                continue
            text = proc.log()
            start = self.log_marks.get(name, 0)
            self.log_marks[name] = len(text)
            found += [f"{name}: {ln}" for ln in text[start:].splitlines() if DENIED.search(ln)]
        return found


def _apply(e: E2E, docs: list[dict[str, Any]]) -> None:
    for d in docs:
        res = e.dyn.resources.get(api_version=d["apiVersion"], kind=d["kind"])
        ns = d["metadata"].get("namespace") or (NAMESPACE if res.namespaced else None)
        res.create(body=d, namespace=ns)


@pytest.fixture(scope="session")
def e2e() -> Iterator[E2E]:
    bin_dir = os.environ["STOWAGE_E2E_BIN"]
    helm = os.environ["STOWAGE_HELM"]
    pool, teardown = make_pool("xfs", 64 << 30)
    cluster = Cluster(pool.base, bin_dir, helm, pool.mount)
    try:
        cluster.start_control_plane()
        api = config.new_client_from_config(config_file=cluster.admin_kubeconfig())
        e = E2E(cluster, api)
        docs = cluster.render_chart()
        e.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        _apply(e, crds)
        ext = client.ApiextensionsV1Api(api)
        for crd in crds:
            wait(
                lambda n=crd["metadata"]["name"]: any(
                    c.type == "Established" and c.status == "True"
                    for c in ext.read_custom_resource_definition(n).status.conditions or []
                ),
                60,
                f"CRD {crd['metadata']['name']} established",
            )
        e.dyn = dynamic.DynamicClient(api)  # fresh discovery now that the CRDs exist
        _apply(e, [d for d in docs if d["kind"] != "CustomResourceDefinition"])
        # What a kubelet would create: the Node (labelled with our topology segment, with
        # controller-managed attach/detach) and its CSINode entry for the driver.
        e.core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=NODE,
                    labels={TOPOLOGY_KEY: NODE, "kubernetes.io/hostname": NODE},
                    annotations={"volumes.kubernetes.io/controller-managed-attach-detach": "true"},
                )
            )
        )
        e.storage.create_csi_node(
            client.V1CSINode(
                metadata=client.V1ObjectMeta(name=NODE),
                spec=client.V1CSINodeSpec(
                    drivers=[
                        client.V1CSINodeDriver(
                            name=DRIVER,
                            node_id=NODE,
                            topology_keys=[TOPOLOGY_KEY],
                            allocatable=client.V1VolumeNodeResources(count=64),
                        )
                    ]
                ),
            )
        )
        wait(lambda: e.pod_of("node"), 60, "the chart DaemonSet's pod object for the node")
        os.makedirs(os.path.dirname(cluster.node_socket))
        os.makedirs(os.path.dirname(cluster.controller_socket))
        cluster.run("driver-node", driver_argv("node", cluster.node_socket, cluster.pool_dir))
        cluster.run(
            "driver-controller",
            driver_argv("controller", cluster.controller_socket),
            env={"KUBECONFIG": e.sa_kubeconfig(cluster.service_account("controller"))},
        )
        e.node.wait_ready(60)
        Client("unix://" + cluster.controller_socket).wait_ready(60)
        for name in SIDECARS:
            e.start_sidecar(name)
        yield e
        e.node.close()
    finally:
        cluster.stop_all()
        print("\n--- e2e logs kept until teardown in", cluster.path("logs"))
        teardown()


@pytest.fixture(autouse=True)
def no_rbac_denials(e2e: E2E) -> Iterator[None]:
    """Any sidecar refused by RBAC during a test fails that test."""
    e2e.denied_lines()  # mark
    yield
    denied = e2e.denied_lines()
    assert not denied, "a sidecar was denied by RBAC:\n" + "\n".join(denied[:20])
