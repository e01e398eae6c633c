"""A Kubernetes control plane and Stowage with the real CSI sidecars, all as local processes.

etcd and kube-apiserver listen on loopback with certificates made for this run; the chart
(rendered by helm, not copied) supplies the CRDs, RBAC, CSIDriver, StorageClasses and even the
DaemonSet and Deployments, whose pods stay Pending (there is no kubelet here) but give the
sidecars a real owner for CSIStorageCapacity. Each sidecar runs with the arguments of its chart
container and authenticates with a token of its chart ServiceAccount. Everything lives under one
temporary directory and is stopped by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMESPACE = "stowage-system"
RELEASE = "stw"
NODE = "e2e-node"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Poll until `predicate` returns something truthy; say what was awaited and how long."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            got = predicate()
            if got:
                print(f"  waited {time.monotonic() - started:5.1f}s for {what}")
                return got
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=REPO,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.popen = None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: str) -> None:
    os.makedirs(d, exist_ok=True)
    p = lambda n: os.path.join(d, n)  # noqa: E731
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", p("ca.key"), "-out", p("ca.crt"), "-subj", "/CN=stowage-e2e-ca",
    )  # fmt: skip
    for name, subj, ext in (
        (
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("admin", "/O=system:masters/CN=e2e-admin", "extendedKeyUsage=clientAuth\n"),
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
        make_certs(certs)
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
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.path('apiserver-certs')}",
                f"--tls-cert-file={c('apiserver.crt')}",
                f"--tls-private-key-file={c('apiserver.key')}",
                f"--client-ca-file={c('ca.crt')}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={c('sa.pub')}",
                f"--service-account-signing-key-file={c('sa.key')}",
                "--authorization-mode=Node,RBAC",
                "--service-cluster-ip-range=10.96.0.0/16",
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


def driver_argv(mode: str, socket_path: str, pool_dir: str = "") -> list[str]:
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
        argv += [f"--node-id={NODE}", f"--pool-dir={pool_dir}"]
    return argv


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str, indent=1)[:2000]
