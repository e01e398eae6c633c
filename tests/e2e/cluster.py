"""A Kubernetes control plane and Stowage with the real CSI sidecars, all as local processes.

etcd and kube-apiserver listen on loopback with certificates made for this run (with
`node_address`, the apiserver also serves a kubelet in a network namespace and the node's pods
through the `kubernetes` Service, and a kube-scheduler runs: the node tier, tests/e2e_node,
which installs the chart with helm and runs Stowage as its pods). In the control-plane tier
(`stowage_world`) the chart (rendered by helm, not copied) supplies the CRDs, RBAC, CSIDriver,
StorageClasses and even the DaemonSet and Deployments, whose pods stay Pending but give the
sidecars a real owner for CSIStorageCapacity. Each sidecar runs with the arguments of its chart
container and authenticates with a token of its chart ServiceAccount. Everything lives under
one temporary directory and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from kubernetes import client, config, dynamic

from driver.ctl.client import Client
from driver.ctl.s3local import LocalS3
from harness import make_pool
from tests.e2e.procs import REPO, Proc, wait

NAMESPACE = "stowage-system"
RELEASE = "stw"
NODE = "e2e-node"
SNAP_GROUP, SNAP_VERSION = "snapshot.storage.k8s.io", "v1"
SERVICE_CIDR, SERVICE_IP = "10.96.0.0/16", "10.96.0.1"  # the `kubernetes` Service's ClusterIP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: str, address: str = "", nodes: tuple[str, ...] = ()) -> None:
    """A CA, the apiserver's serving certificate (for loopback, and `address` when a node must
    reach it), an admin client, a client per node (system:node:<name> in system:nodes, what the
    Node authorizer and NodeRestriction expect of a kubelet) and the service-account key."""
    os.makedirs(d, exist_ok=True)
    p = lambda n: os.path.join(d, n)  # noqa: E731
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", p("ca.key"), "-out", p("ca.crt"), "-subj", "/CN=stowage-e2e-ca",
    )  # fmt: skip
    sans = "IP:127.0.0.1,DNS:localhost"
    if address:  # and the `kubernetes` Service, which the node's pods reach it through
        sans += f",IP:{address},IP:{SERVICE_IP},DNS:kubernetes.default.svc"
    client_auth = "extendedKeyUsage=clientAuth\n"
    for name, subj, ext in (
        (
            "apiserver",
            "/CN=kube-apiserver",
            f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n",
        ),
        ("admin", "/O=system:masters/CN=e2e-admin", client_auth),
        *((f"node-{n}", f"/O=system:nodes/CN=system:node:{n}", client_auth) for n in nodes),
    ):
        with open(p(f"{name}.ext"), "w", encoding="ascii") as fh:
            fh.write(ext)
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", p(f"{name}.key"),
            "-out", p(f"{name}.csr"), "-subj", subj,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", p(f"{name}.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"),
            "-CAcreateserial", "-days", "2", "-out", p(f"{name}.crt"), "-extfile", p(f"{name}.ext"),
        )  # fmt: skip
    _openssl("genrsa", "-out", p("sa.key"), "2048")
    _openssl("rsa", "-in", p("sa.key"), "-pubout", "-out", p("sa.pub"))


def kubeconfig(path: str, server: str, ca: str, user: dict[str, str]) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "u"}}],
        "current-context": "e2e",
    }
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    os.chmod(path, 0o600)
    return path


@dataclass
class Cluster:
    base: str  # everything of this run lives here
    bin_dir: str
    helm: str
    pool_dir: str
    procs: dict[str, Proc] = field(default_factory=dict)
    api_port: int = 0
    rendered: list[dict[str, Any]] = field(default_factory=list)
    # The node tier: the host end of the node's veth. The apiserver then listens on every address
    # (the veth appears only when the node starts), serves a certificate for this one, admits
    # kubelets (NodeRestriction) and a kube-scheduler runs. "" = loopback only, no kubelet.
    node_address: str = ""
    # The node driver's credentials (its chart ServiceAccount) for --watch-volume-attributes.
    node_driver_kubeconfig: str = ""
    # Off-node backups: a loopback S3 (weed mini) the drivers use as target BACKUP_TARGET, the
    # chart rendered with backup values (its controller csi-snapshotter included). None = off.
    s3: LocalS3 | None = None

    # --- paths ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def node_socket(self) -> str:
        return self.path("node", "csi.sock")

    @property
    def controller_socket(self) -> str:
        return self.path("controller", "csi.sock")

    def admin_kubeconfig(self) -> str:
        return self.path("admin.kubeconfig")

    def kubelet_kubeconfig(self, node: str = NODE) -> str:
        """The kubelet's: the apiserver at the node address, client system:node:<node>."""
        c = lambda n: self.path("pki", n)  # noqa: E731
        return kubeconfig(
            self.path(f"kubelet-{node}.kubeconfig"),
            f"https://{self.node_address}:{self.api_port}",
            c("ca.crt"),
            {"client-certificate": c(f"node-{node}.crt"), "client-key": c(f"node-{node}.key")},
        )

    # --- processes --------------------------------------------------------------------------
    def run(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        os.makedirs(self.path("logs"), exist_ok=True)
        proc = Proc(name, argv, self.path("logs", f"{name}.log"), env or {}).start()
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def logs(self, name: str) -> str:
        return self.procs[name].log()

    # --- control plane ----------------------------------------------------------------------
    def start_control_plane(self) -> None:
        certs = self.path("pki")
        with_node = bool(self.node_address)
        make_certs(certs, self.node_address, (NODE,) if with_node else ())
        c = lambda n: os.path.join(certs, n)  # noqa: E731
        etcd_port, peer_port = free_port(), free_port()
        self.run(
            "etcd",
            [
                os.path.join(self.bin_dir, "etcd"),
                "--name=e2e",
                f"--data-dir={self.path('etcd')}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=e2e=http://127.0.0.1:{peer_port}",
                "--log-level=warn",
                "--quota-backend-bytes=1073741824",
            ],
        )
        self.api_port = free_port()
        self.run(
            "kube-apiserver",
            [
                os.path.join(self.bin_dir, "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={'0.0.0.0' if with_node else '127.0.0.1'}",
                f"--advertise-address={self.node_address or '127.0.0.1'}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.path('apiserver-certs')}",
                f"--tls-cert-file={c('apiserver.crt')}",
                f"--tls-private-key-file={c('apiserver.key')}",
                f"--client-ca-file={c('ca.crt')}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={c('sa.pub')}",
                f"--service-account-signing-key-file={c('sa.key')}",
                "--authorization-mode=Node,RBAC",
                *(
                    [
                        "--enable-admission-plugins=NodeRestriction",
                        # kubectl exec/logs: the kubelet trusts this CA (Node client_ca_file)
                        f"--kubelet-client-certificate={c('admin.crt')}",
                        f"--kubelet-client-key={c('admin.key')}",
                        "--kubelet-preferred-address-types=InternalIP",  # no DNS for nodes
                    ]
                    if with_node
                    else []
                ),
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        kubeconfig(
            self.admin_kubeconfig(),
            self.server,
            c("ca.crt"),
            {"client-certificate": c("admin.crt"), "client-key": c("admin.key")},
        )
        wait(self._readyz, 120, "kube-apiserver /readyz", every=0.5)
        self.run(
            "kube-controller-manager",
            [
                os.path.join(self.bin_dir, "kube-controller-manager"),
                f"--kubeconfig={self.admin_kubeconfig()}",
                f"--authentication-kubeconfig={self.admin_kubeconfig()}",
                f"--authorization-kubeconfig={self.admin_kubeconfig()}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.path('kcm-certs')}",
                "--leader-elect=false",
                f"--service-account-private-key-file={c('sa.key')}",
                f"--root-ca-file={c('ca.crt')}",
                "--use-service-account-credentials=true",
                "--v=1",
            ],
        )
        if with_node:  # places pods, and sets selected-node on WaitForFirstConsumer claims
            self.run(
                "kube-scheduler",
                [
                    os.path.join(self.bin_dir, "kube-scheduler"),
                    f"--kubeconfig={self.admin_kubeconfig()}",
                    f"--authentication-kubeconfig={self.admin_kubeconfig()}",
                    f"--authorization-kubeconfig={self.admin_kubeconfig()}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    "--leader-elect=false",
                    "--v=1",
                ],
            )

    def _readyz(self) -> bool:
        certs = self.path("pki")
        ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.crt"))
        ctx.load_cert_chain(os.path.join(certs, "admin.crt"), os.path.join(certs, "admin.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.api_port, context=ctx, timeout=5)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    # --- the chart ----------------------------------------------------------------------------
    def render_chart(self, *values: str) -> list[dict[str, Any]]:
        argv = [self.helm, "template", RELEASE, os.path.join(REPO, "charts", "stowage")]
        argv += ["--namespace", NAMESPACE]
        for v in values:
            argv += ["--set", v]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        self.rendered = [d for d in yaml.safe_load_all(out) if d]
        return self.rendered

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.rendered if d["kind"] == kind]

    def has_container(self, workload: str, name: str) -> bool:
        try:
            self.container(workload, name)
        except KeyError:
            return False
        return True

    def container(self, workload: str, name: str) -> dict[str, Any]:
        for d in self.rendered:
            if d["kind"] in ("DaemonSet", "Deployment") and d["metadata"]["name"].endswith(
                workload
            ):
                for ctr in d["spec"]["template"]["spec"]["containers"]:
                    if ctr["name"] == name:
                        return dict(ctr)
        raise KeyError(f"no container {name} in {workload}")

    def service_account(self, workload: str) -> str:
        for d in self.rendered:
            if d["kind"] in ("DaemonSet", "Deployment") and d["metadata"]["name"].endswith(
                workload
            ):
                return str(d["spec"]["template"]["spec"]["serviceAccountName"])
        raise KeyError(workload)


def sidecar_argv(
    container: dict[str, Any], binary: str, socket_path: str, kubeconfig_path: str
) -> list[str]:
    """The chart container's arguments, with the socket and kubeconfig of this run."""
    argv = [binary]
    for arg in container.get("args", []):
        if arg.startswith("--csi-address="):
            arg = f"--csi-address={socket_path}"
        elif arg.startswith("--http-endpoint=") or arg.startswith("--metrics-address="):
            continue  # no port clashes between runs; the chart test checks these
        argv.append(arg)
    return [*argv, f"--kubeconfig={kubeconfig_path}"]


def sidecar_env(container: dict[str, Any], values: dict[str, str]) -> dict[str, str]:
    """Resolve the chart container's fieldRef env vars (NODE_NAME, POD_NAME, NAMESPACE)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            field_path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = values[field_path]
    return env


def driver_argv(
    mode: str, socket_path: str, pool_dir: str = "", node: str = NODE, s3: LocalS3 | None = None
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "driver",
        f"--mode={mode}",
        f"--endpoint=unix://{socket_path}",
        "--log-level=debug",
        "--log-format=json",
    ]
    if pool_dir:
        # The run's pool is a real XFS mount (make_pool), so the chart's default applies.
        argv += [f"--node-id={node}", f"--pool-dir={pool_dir}", "--pool-require-mountpoint"]
    if s3 is not None:  # the flags the chart renders with backup values, on this run's paths
        argv += [
            f"--backup-target={BACKUP_TARGET}=s3://{BACKUP_BUCKET}/e2e?endpoint={s3.endpoint}",
            f"--backup-key-file={os.path.join(s3.base, 'backup.key')}",
            f"--backup-cluster-id={BACKUP_CLUSTER}",
        ]
    return argv


BACKUP_TARGET, BACKUP_BUCKET, BACKUP_CLUSTER = "main", "stowage-e2e", "e2e-cluster"


def backup_chart_values(cluster: Cluster) -> tuple[str, ...]:
    """The chart's backup values for this run's S3 (the Secrets are named, not read: the
    drivers run as local processes with the same flags and environment)."""
    assert cluster.s3 is not None
    url = f"s3://{BACKUP_BUCKET}/e2e?endpoint={cluster.s3.endpoint}"
    return (
        f"backup.targets[0].name={BACKUP_TARGET}",
        f"backup.targets[0].url={url}",
        "backup.credentialsSecret=stowage-s3",
        "backup.keySecret=stowage-backup-key",
        f"backup.clusterId={BACKUP_CLUSTER}",
    )


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str, indent=1)[:2000]


# --- the session both tiers share ---------------------------------------------------------------
DRIVER = "stowage.csi.io"
TOPOLOGY_KEY = "topology.stowage.csi.io/node"
# Sidecar → (chart workload, container, which is also the binary's name). Each runs as its
# workload's ServiceAccount; one the chart did not render (the controller's csi-snapshotter
# without backup values) is not started.
SIDECARS = {
    "csi-provisioner": ("node", "csi-provisioner"),
    "csi-snapshotter": ("node", "csi-snapshotter"),
    "csi-resizer": ("controller", "csi-resizer"),
    "controller-snapshotter": ("controller", "csi-snapshotter"),
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
        self.apps = client.AppsV1Api(api)
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

    def start_sidecar(
        self,
        name: str,
        kubeconfig_path: str = "",
        proc_name: str = "",
        node: str = NODE,
        node_socket: str = "",
    ) -> None:
        """Start a chart sidecar as its container would run; a node sidecar of `node` (its
        DaemonSet pod's identity) on `node_socket` (default: the session node's)."""
        c = self.cluster
        workload, container_name = SIDECARS[name]
        ctr = c.container(workload, container_name)
        kc = kubeconfig_path or self.sa_kubeconfig(c.service_account(workload))
        sock = c.controller_socket if workload == "controller" else node_socket or c.node_socket
        pod = self.pod_of(workload, node)
        env = sidecar_env(
            ctr,
            {
                "spec.nodeName": node,
                "metadata.name": pod,
                "metadata.namespace": NAMESPACE,
            },
        )
        c.run(
            proc_name or name,
            sidecar_argv(ctr, os.path.join(c.bin_dir, container_name), sock, kc),
            env=env,
        )

    def pod_of(self, workload: str, node: str = NODE) -> str:
        """The Pending pod the chart's DaemonSet/Deployment made (the sidecar's identity); the
        DaemonSet's is the one for `node`."""
        pods = self.core.list_namespaced_pod(NAMESPACE).items
        for p in pods:
            if p.metadata.name.startswith(f"stw-stowage-{workload}-"):
                if workload == "controller" and "snapshot" in p.metadata.name:
                    continue
                if workload == "node" and not _pod_for_node(p, node):
                    continue
                return str(p.metadata.name)
        return ""

    def create_claim(
        self,
        name: str,
        size: str = "64Mi",
        sc: str = "stowage",
        block: bool = False,
        source: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        namespace: str = "default",
    ) -> client.V1PersistentVolumeClaim:
        spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": sc,
            "resources": {"requests": {"storage": size}},
            "volumeMode": "Block" if block else "Filesystem",
        }
        if source:
            spec["dataSource"] = source
        body = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": spec,
        }
        return self.core.create_namespaced_persistent_volume_claim(namespace, body)

    def snapshot(
        self, name: str, claim: str, namespace: str = "default", snapshot_class: str = "stowage"
    ) -> dict[str, Any]:
        """A VolumeSnapshot of `claim`, once readyToUse."""
        body = {
            "apiVersion": f"{SNAP_GROUP}/{SNAP_VERSION}",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name},
            "spec": {
                "volumeSnapshotClassName": snapshot_class,
                "source": {"persistentVolumeClaimName": claim},
            },
        }
        args = (SNAP_GROUP, SNAP_VERSION, namespace, "volumesnapshots")
        self.custom.create_namespaced_custom_object(*args, body)
        return dict(
            wait(
                lambda: (
                    (s := self.custom.get_namespaced_custom_object(*args, name))
                    .get("status", {})
                    .get("readyToUse")
                    and s
                ),
                90,
                f"VolumeSnapshot {name} readyToUse",
            )
        )

    def denied_lines(self) -> list[str]:
        """Lines where a sidecar was refused by RBAC since the last call."""
        found = []
        for name, proc in self.cluster.procs.items():
            if not any(name.startswith(s) for s in SIDECARS):  # incl. csi-provisioner-node-a
                continue
            text = proc.log()
            start = self.log_marks.get(name, 0)
            self.log_marks[name] = len(text)
            found += [f"{name}: {ln}" for ln in text[start:].splitlines() if DENIED.search(ln)]
        return found


def _pod_for_node(pod: client.V1Pod, node: str) -> bool:
    """A DaemonSet pod is bound to its node by spec.nodeName or, before scheduling, by the
    node affinity the DaemonSet controller gives it."""
    if pod.spec.node_name:
        return bool(pod.spec.node_name == node)
    affinity = pod.spec.affinity and pod.spec.affinity.node_affinity
    terms = affinity.required_during_scheduling_ignored_during_execution if affinity else None
    return any(
        node in (f.values or [])
        for t in (terms.node_selector_terms if terms else [])
        for f in (t.match_fields or [])
    )


def apply(e: E2E, docs: list[dict[str, Any]]) -> None:
    for d in docs:
        res = e.dyn.resources.get(api_version=d["apiVersion"], kind=d["kind"])
        ns = d["metadata"].get("namespace") or (NAMESPACE if res.namespaced else None)
        res.create(body=d, namespace=ns)


def bring_up(cluster: Cluster, *chart_values: str) -> E2E:
    """The control plane, then the rendered chart: CRDs (awaited until established), then the
    rest (RBAC, CSIDriver, StorageClasses, VolumeSnapshotClass, workloads)."""
    cluster.start_control_plane()
    api = config.new_client_from_config(config_file=cluster.admin_kubeconfig())
    e = E2E(cluster, api)
    docs = cluster.render_chart(*chart_values)
    e.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    apply(e, crds)
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
    apply(e, [d for d in docs if d["kind"] != "CustomResourceDefinition"])
    return e


def fake_node(e: E2E, _stack: contextlib.ExitStack, name: str = NODE) -> None:
    """What a kubelet would create, for the tier without one: the Node (labelled with our
    topology segment, with controller-managed attach/detach) and its CSINode entry."""
    e.core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(
                name=name,
                labels={TOPOLOGY_KEY: name, "kubernetes.io/hostname": name},
                annotations={"volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            )
        )
    )
    e.storage.create_csi_node(
        client.V1CSINode(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1CSINodeSpec(
                drivers=[
                    client.V1CSINodeDriver(
                        name=DRIVER,
                        node_id=name,
                        topology_keys=[TOPOLOGY_KEY],
                        allocatable=client.V1VolumeNodeResources(count=64),
                    )
                ]
            ),
        )
    )


def start_node_driver(
    cluster: Cluster, node: str = NODE, socket_path: str = "", pool_dir: str = ""
) -> None:
    """A node-mode driver (the session node's unless told otherwise) as the chart's DaemonSet
    runs it: with the backup target when the run has one, and for the session node with
    --watch-volume-attributes (ModifyVolume) as the node ServiceAccount; returns once Probe
    answers ready."""
    sock = socket_path or cluster.node_socket
    os.makedirs(os.path.dirname(sock), exist_ok=True)
    argv = driver_argv("node", sock, pool_dir or cluster.pool_dir, node, cluster.s3)
    if node == NODE and cluster.node_driver_kubeconfig:
        argv += ["--watch-volume-attributes", f"--kubeconfig={cluster.node_driver_kubeconfig}"]
    cluster.run(
        "driver-node" if node == NODE else f"driver-{node}",
        argv,
        env=cluster.s3.env() if cluster.s3 else {},
    )
    probe = Client("unix://" + sock)
    probe.wait_ready(60)
    probe.close()


def start_drivers(e: E2E) -> None:
    """Stowage in node mode (on the pool, watching PersistentVolumes as the node
    ServiceAccount) and controller mode (no Kubernetes credentials: it reads nothing from the
    API; with backups, the object store's)."""
    cluster = e.cluster
    cluster.node_driver_kubeconfig = e.sa_kubeconfig(cluster.service_account("node"))
    start_node_driver(cluster)
    os.makedirs(os.path.dirname(cluster.controller_socket), exist_ok=True)
    cluster.run(
        "driver-controller",
        driver_argv("controller", cluster.controller_socket, s3=cluster.s3),
        env=cluster.s3.env() if cluster.s3 else {},
    )
    probe = Client("unix://" + cluster.controller_socket)
    probe.wait_ready(60)
    probe.close()


def start_s3(cluster: Cluster) -> None:
    """The run's loopback S3 (weed mini), its bucket and a random repository key."""
    s3 = LocalS3(cluster.path("s3")).start()
    cluster.s3 = s3
    s3.make_bucket(BACKUP_BUCKET)
    fd = os.open(os.path.join(s3.base, "backup.key"), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(os.urandom(32).hex() + "\n")


@contextlib.contextmanager
def stowage_world(
    join: Callable[[E2E, contextlib.ExitStack], None], backups: bool = False
) -> Iterator[E2E]:
    """A pool, the control plane with the chart, both driver modes, then `join` (which makes
    the node known: fake_node; it may push its own teardown on the stack, which runs first),
    then every sidecar. With `backups`, first a loopback S3 that both drivers use as their
    backup target, and the chart rendered with the backup values. Torn down even on failure:
    processes by PID, mounts, loops and the
    temporary directory."""
    pool, teardown = make_pool("xfs", 64 << 30)
    cluster = Cluster(
        pool.base, os.environ["STOWAGE_E2E_BIN"], os.environ["STOWAGE_HELM"], pool.mount
    )
    with contextlib.ExitStack() as stack:
        stack.callback(teardown)
        stack.callback(lambda: print("\n--- e2e logs kept until teardown in", cluster.path("logs")))
        stack.callback(cluster.stop_all)
        values: tuple[str, ...] = ()
        if backups:
            start_s3(cluster)
            assert cluster.s3 is not None
            stack.callback(cluster.s3.stop)
            values = backup_chart_values(cluster)
        e = bring_up(cluster, *values)
        stack.callback(e.node.close)
        start_drivers(e)
        join(e, stack)
        # The DaemonSet's pod (made once the Node exists) is the node sidecars' identity.
        wait(lambda: e.pod_of("node"), 60, "the chart DaemonSet's pod object for the node")
        for name, (workload, container) in SIDECARS.items():
            if cluster.has_container(workload, container):
                e.start_sidecar(name)
        yield e


@pytest.fixture(autouse=True)
def no_rbac_denials(e2e: E2E) -> Iterator[None]:
    """Any sidecar refused by RBAC during a test fails that test."""
    e2e.denied_lines()  # mark
    yield
    denied = e2e.denied_lines()
    assert not denied, "a sidecar was denied by RBAC:\n" + "\n".join(denied[:20])
