"""A Kubernetes node as local processes: containerd and kubelet in a network namespace.

No container engine and no systemd: containerd v2 (built by tools/build-node.sh) runs runc from
Debian, CNI plugins from Debian's /usr/lib/cni, and images made by tools/mkimage.py and imported
with `ctr`. The node lives in a network namespace of its own with a veth pair to the host (the
kubelet refuses loopback node IPs; the host side's address is where a control plane on this
machine can listen for it). Everything a run writes is under `workdir`: containerd's root and
state, the pod network namespaces, the kubelet's root, pod logs, CNI state and static pods.

The few things that cannot live there are recorded and undone by `stop()`: the named network
namespace (/run/netns), the pods' cgroups (one cgroup root per node in every hierarchy), the
kernel sysctls the kubelet sets, shim sockets under /run/containerd/s, libcni's cache entries
and /var/log/containers links. `stop()` kills only PIDs it started or that run in its own
cgroups or belong to its own containerd, unmounts everything under `workdir`, and is safe after
a partial `start()` or twice.

    node = Node(workdir, "e2e-node", kubeconfig=None)   # None: standalone kubelet
    try:
        node.start()
        node.add_static_pod({...})
    finally:
        node.stop()

With a kubeconfig and `proxy_kubeconfig`, kube-proxy (iptables mode) runs in the node's network
namespace too, so pods reach the apiserver through the `kubernetes` Service as in a cluster, and
the host routes the pod subnet to the node (the apiserver's answers find their way back). The
kubelet's root directory is a shared bind mount of itself: a real node's / is shared (systemd),
this machine's is private, and containerd refuses a Bidirectional hostPath (the CSI node plugin's
kubelet directory) on a mount that is not shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.e2e.procs import Fatal, Proc, wait

CACHE = os.path.expanduser(os.environ.get("STOWAGE_E2E_CACHE", "~/.cache/stowage/e2e/k8s-v1.34.4"))
BIN = os.environ.get("STOWAGE_E2E_BIN", os.path.join(CACHE, "bin"))
IMAGES = os.environ.get("STOWAGE_E2E_IMAGES", os.path.join(os.path.dirname(BIN), "images"))
PAUSE_IMAGE = "registry.local/pause:3.10"
BUSYBOX_IMAGE = "registry.local/busybox:stowage"
CNI_BIN = "/usr/lib/cni"
CGROUP_FS = "/sys/fs/cgroup"
CNI_CACHE = "/var/lib/cni"
SHIM_SOCKETS = "/run/containerd/s"
CONTAINER_LOG_LINKS = "/var/log/containers"
# Host paths that containerd, libcni, ip and the kubelet make whatever their configuration says
# (children before parents). The first Node of this process to start notes which exist; the last
# to stop removes those that did not, once nothing else is in them.
HOST_PATHS = (
    f"{CNI_CACHE}/results",
    CNI_CACHE,
    SHIM_SOCKETS,
    os.path.dirname(SHIM_SOCKETS),
    "/var/lib/kubelet/device-plugins/kubelet.sock",  # the device manager ignores --root-dir
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet",
    CONTAINER_LOG_LINKS,
)  # /run/netns stays: `ip netns` makes it a shared mount of its own, for all its users
_host_before: dict[str, bool] = {}
_live_nodes: list[Node] = []
# Host-wide sysctls the kubelet sets at start when protectKernelDefaults is false (it refuses to
# start when they differ and it is true): saved before, restored by stop().
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


def log(msg: str) -> None:
    print(f"node: {msg}", flush=True)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} -> {p.returncode}: {p.stderr.strip() or p.stdout.strip()}"
        )
    return p


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    return wait(predicate, timeout, what, every, say=lambda m: log(m.strip()))


def _mountinfo_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # \040 and friends
    return points


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_healthz(proc: Proc, url: str, timeout: float) -> None:
    """Until `url` answers 200; at once if `proc` exits; its log's tail on a timeout."""

    def healthy() -> bool:
        if not proc.alive():
            raise Fatal(f"{proc.name} exited:\n{proc.tail(40)}")
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)

    try:
        wait_for(healthy, timeout, f"{proc.name} healthz")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{proc.tail(40)}") from None


class Node:
    """One node. `index` (0-200) picks its addresses: veth 10.231.<index>.1 (host) and .2 (node),
    pods 10.232.<index>.0/24, so several nodes can run side by side."""

    def __init__(
        self,
        workdir: str,
        name: str,
        kubeconfig: str | None = None,
        *,
        index: int = 0,
        bin_dir: str = BIN,
        images_dir: str = IMAGES,
        images: tuple[str, ...] = ("pause.tar", "busybox.tar"),
        kubelet_args: tuple[str, ...] = (),
        kubelet_config: dict[str, Any] | None = None,
        runc: str = os.environ.get("STOWAGE_E2E_RUNC", "/usr/sbin/runc"),
        proxy_kubeconfig: str | None = None,
        client_ca_file: str = "",
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.name = name
        self.kubeconfig = kubeconfig
        self.bin_dir = bin_dir
        self.images_dir = images_dir
        self.images = images
        self.extra_kubelet_args = kubelet_args
        self.extra_kubelet_config = kubelet_config or {}
        self.runc = runc
        self.proxy_kubeconfig = proxy_kubeconfig
        self.client_ca_file = client_ca_file  # apiserver → kubelet (exec, logs) client certs
        tag = secrets.token_hex(3)
        self.netns = f"stw-{tag}"
        self.host_if = f"stwh{tag}"  # ≤ 15 characters
        self.node_if = "eth0"
        self.host_ip = f"10.231.{index}.1"
        self.node_ip = f"10.231.{index}.2"
        self.pod_subnet = f"10.232.{index}.0/24"
        self.cni_network = f"stowage-{tag}"
        self.cgroup_root = f"/stowage-e2e-{tag}"
        self.kubelet_port = 10250
        self.healthz_port = 10248
        d = lambda *p: os.path.join(self.workdir, *p)  # noqa: E731
        self.logs = d("logs")
        self.ctd_root, self.ctd_state = d("containerd", "root"), d("containerd", "state")
        self.ctd_config = d("containerd", "config.toml")
        self.ctd_sock = d("containerd", "containerd.sock")
        self.cni_conf_dir, self.cni_ipam_dir = d("cni", "net.d"), d("cni", "ipam")
        self.kubelet_root = d("kubelet")
        self.kubelet_config_path = d("kubelet-config.json")
        self.proxy_config_path = d("kube-proxy-config.json")
        self.static_pod_dir = d("manifests")
        self.pod_logs_dir = d("pod-logs")
        self.containerd: Proc | None = None
        self.kubelet: Proc | None = None
        self.kube_proxy: Proc | None = None
        # What stop() must undo; filled as start() goes.
        self._made_netns = False
        self._made_cgroups: list[str] = []
        self._saved_sysctls: dict[str, str] = {}
        self._past_task_ids: set[str] = set()  # tasks of runs before a power_off()

    # ---------------------------------------------------------------- start
    def start(self) -> Node:
        started = time.monotonic()
        for p in ("kubelet", "containerd", "containerd-shim-runc-v2", "ctr"):
            if not os.access(os.path.join(self.bin_dir, p), os.X_OK):
                raise FileNotFoundError(
                    f"{p} missing in {self.bin_dir}: run tests/e2e/tools/build-node.sh"
                )
        for p in (self.logs, self.ctd_root, self.ctd_state, self.cni_conf_dir, self.cni_ipam_dir,
                  self.kubelet_root, self.static_pod_dir, self.pod_logs_dir):  # fmt: skip
            os.makedirs(p, exist_ok=True)
        if not _live_nodes:
            _host_before.clear()
            _host_before.update({p: os.path.lexists(p) for p in HOST_PATHS})
        if self not in _live_nodes:
            _live_nodes.append(self)
        self._save_state()
        self._network()
        self._cgroups()
        self._save_sysctls()
        self._save_state()
        self._write_cni()
        self._start_containerd()
        self._import_images()
        self._start_kubelet()
        self._start_kube_proxy()
        log(f"node {self.name} up at {self.node_ip} in {time.monotonic() - started:.1f}s")
        return self

    def _network(self) -> None:
        run("ip", "netns", "add", self.netns)
        self._made_netns = True
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if,
            "netns", self.netns)  # fmt: skip
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        ns = ("ip", "-n", self.netns)
        run(*ns, "link", "set", "lo", "up")
        run(*ns, "addr", "add", f"{self.node_ip}/24", "dev", self.node_if)
        run(*ns, "link", "set", self.node_if, "up")
        run(*ns, "route", "add", "default", "via", self.host_ip)
        # The pods' answers to the host (the apiserver): gone with the veth.
        run("ip", "route", "add", self.pod_subnet, "via", self.node_ip, "dev", self.host_if)

    def _hierarchies(self) -> list[str]:
        """The mounted cgroup hierarchies (v1 controllers, name=systemd, and cgroup2 if mounted)."""
        out = []
        for entry in sorted(os.listdir(CGROUP_FS)):
            path = os.path.join(CGROUP_FS, entry)
            if os.path.isdir(path) and not os.path.islink(path) and os.path.ismount(path):
                out.append(path)
        if not out and os.path.exists(os.path.join(CGROUP_FS, "cgroup.controllers")):
            out.append(CGROUP_FS)  # pure cgroup v2
        return out

    def _cgroups(self) -> None:
        """The kubelet refuses a cgroupRoot that does not exist: make it in every hierarchy."""
        for h in self._hierarchies():
            path = h + self.cgroup_root
            os.mkdir(path)
            self._made_cgroups.append(path)
            if os.path.exists(os.path.join(h, "cpuset.cpus")):
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(h, f), encoding="ascii") as src:
                        value = src.read().strip()
                    with open(os.path.join(path, f), "w", encoding="ascii") as dst:
                        dst.write(value)

    def _save_sysctls(self) -> None:
        for key in KUBELET_SYSCTLS:
            with contextlib.suppress(OSError), open(f"/proc/sys/{key}", encoding="ascii") as fh:
                self._saved_sysctls[key] = fh.read().strip()

    def _write_cni(self) -> None:
        conf = {
            "cniVersion": "1.0.0",
            "name": self.cni_network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.pod_subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.cni_ipam_dir,
                    },
                },
            ],
        }
        with open(
            os.path.join(self.cni_conf_dir, "10-stowage.conflist"), "w", encoding="utf-8"
        ) as fh:
            json.dump(conf, fh, indent=1)

    def _containerd_toml(self) -> str:
        q = json.dumps  # a TOML basic string is a JSON string for these paths
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        return f"""version = 3
root = {q(self.ctd_root)}
state = {q(self.ctd_state)}
oom_score = 0

[grpc]
  address = {q(self.ctd_sock)}

[ttrpc]
  address = {q(self.ctd_sock + ".ttrpc")}

[debug]
  level = "info"

[metrics]
  address = ""

[plugins.'io.containerd.internal.v1.opt']
  path = {q(os.path.join(self.workdir, "containerd", "opt"))}

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  discard_unpacked_layers = false
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = {q(PAUSE_IMAGE)}

[{runtime}]
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # Sandboxes ask for oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which the session
  # sandbox on these machines does not grant (runc: "failed to update /proc/self/oom_score_adj:
  # Permission denied"). Clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  [{runtime}.containerd]
    default_runtime_name = "runc"
    [{runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{runtime}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = {q(self.runc)}
        Root = {q(os.path.join(self.workdir, "runc"))}
  [{runtime}.cni]
    bin_dirs = [{q(CNI_BIN)}]
    conf_dir = {q(self.cni_conf_dir)}
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

    def _in_netns(self, *argv: str) -> list[str]:
        # nsenter switches only the network namespace: `ip netns exec` would also give the process
        # a private mount namespace and a fresh /sys without the cgroup mounts.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(os.path.join(self.bin_dir, "ctr"), "--address", self.ctd_sock, "-n", "k8s.io",
                   *args, check=check)  # fmt: skip

    def _start_containerd(self) -> None:
        with open(self.ctd_config, "w", encoding="utf-8") as fh:
            fh.write(self._containerd_toml())
        self.containerd = Proc(
            "containerd",
            self._in_netns(os.path.join(self.bin_dir, "containerd"), "--config", self.ctd_config),
            os.path.join(self.logs, "containerd.log"),
            env={
                "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
            },
        )
        self.containerd.start()
        self._save_state()

        def ready() -> bool:
            if not self.containerd or not self.containerd.alive():
                raise Fatal(f"containerd exited:\n{self.containerd and self.containerd.tail()}")
            return self._ctr("version", check=False).returncode == 0

        wait_for(ready, 60, "containerd")

    def _import_images(self) -> None:
        for image in self.images:
            path = os.path.join(self.images_dir, image)
            self._ctr(
                "images", "import", "--platform", "linux/amd64", "--snapshotter", "overlayfs", path
            )
        names = self._ctr("images", "ls", "-q").stdout.split()
        log(f"images: {' '.join(n for n in names if not n.startswith('sha256:'))}")
        if PAUSE_IMAGE not in names:
            raise RuntimeError(f"{PAUSE_IMAGE} not imported: {names}")

    def kubelet_configuration(self) -> dict[str, Any]:
        standalone = self.kubeconfig is None
        cfg: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": False,
            "oomScoreAdj": 0,  # -999 needs CAP_SYS_RESOURCE (see restrict_oom_score_adj)
            "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{self.ctd_sock}",
            "staticPodPath": self.static_pod_dir,
            "fileCheckFrequency": "2s",
            "syncFrequency": "10s",
            "podLogsDir": self.pod_logs_dir,
            "volumePluginDir": os.path.join(self.workdir, "volume-plugins"),
            "address": self.node_ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": self.node_ip,
            "healthzPort": self.healthz_port,
            "resolvConf": "",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": False,
            "protectKernelDefaults": False,
            "localStorageCapacityIsolation": True,
            "enableControllerAttachDetach": True,
            "registerNode": not standalone,
            "authentication": {
                "anonymous": {"enabled": standalone},
                "webhook": {"enabled": not standalone},
                "x509": {"clientCAFile": self.client_ca_file} if self.client_ca_file else {},
            },
            "authorization": {"mode": "AlwaysAllow" if standalone else "Webhook"},
        }
        cfg.update(self.extra_kubelet_config)
        return cfg

    def _share_kubelet_root(self) -> None:
        if self.kubelet_root not in _mountinfo_points():
            run("mount", "--bind", self.kubelet_root, self.kubelet_root)
        run("mount", "--make-rshared", self.kubelet_root)

    def _start_kube_proxy(self) -> None:
        """kube-proxy in iptables mode in the node's network namespace (its rules die with it).
        Conntrack sysctls are left alone (they are not per namespace on this kernel)."""
        if not (self.kubeconfig and self.proxy_kubeconfig):
            return
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.proxy_kubeconfig},
            "hostnameOverride": self.name,
            "bindAddress": self.node_ip,
            "mode": "iptables",
            "clusterCIDR": self.pod_subnet,
            "conntrack": {
                "maxPerCore": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "healthzBindAddress": f"{self.node_ip}:10256",
            "metricsBindAddress": "127.0.0.1:10249",
        }
        with open(self.proxy_config_path, "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=1)
        self.kube_proxy = Proc(
            "kube-proxy",
            self._in_netns(
                os.path.join(self.bin_dir, "kube-proxy"),
                f"--config={self.proxy_config_path}",
                "--v=2",
            ),
            os.path.join(self.logs, "kube-proxy.log"),
        )
        self.kube_proxy.start()
        self._save_state()
        _wait_healthz(self.kube_proxy, f"http://{self.node_ip}:10256/healthz", 60)

    def _start_kubelet(self) -> None:
        self._share_kubelet_root()
        with open(self.kubelet_config_path, "w", encoding="utf-8") as fh:
            json.dump(self.kubelet_configuration(), fh, indent=1)
        argv = [
            os.path.join(self.bin_dir, "kubelet"),
            f"--config={self.kubelet_config_path}",
            f"--root-dir={self.kubelet_root}",
            f"--cert-dir={os.path.join(self.kubelet_root, 'pki')}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}",
            "--v=2",
        ]
        if self.kubeconfig:
            argv.append(f"--kubeconfig={self.kubeconfig}")
        argv += self.extra_kubelet_args
        self.kubelet = Proc(
            "kubelet", self._in_netns(*argv), os.path.join(self.logs, "kubelet.log")
        )
        self.kubelet.start()
        self._save_state()
        _wait_healthz(self.kubelet, f"http://{self.node_ip}:{self.healthz_port}/healthz", 90)

    # ---------------------------------------------------------------- use
    def add_static_pod(self, pod: dict[str, Any]) -> str:
        name = f"{pod['metadata']['name']}.json"
        path, tmp = os.path.join(self.static_pod_dir, name), os.path.join(self.workdir, name)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(pod, fh, indent=1)
        os.replace(tmp, path)  # the kubelet reads every file there, half-written ones too
        return path

    def remove_static_pods(self) -> None:
        if os.path.isdir(self.static_pod_dir):
            for f in os.listdir(self.static_pod_dir):
                os.unlink(os.path.join(self.static_pod_dir, f))

    def kubelet_pods(self) -> list[dict[str, Any]]:
        """The kubelet's own /pods (standalone: anonymous and AlwaysAllow)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        url = f"https://{self.node_ip}:{self.kubelet_port}/pods"
        with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
            return list(json.load(r).get("items") or [])

    def cgroup_pids(self) -> list[int]:
        """PIDs in this node's pod cgroups (every hierarchy, whole subtree)."""
        pids: set[int] = set()
        for path in self._made_cgroups:
            for dirpath, _dirs, files in os.walk(path):
                if "cgroup.procs" in files:
                    with (
                        contextlib.suppress(OSError),
                        open(os.path.join(dirpath, "cgroup.procs")) as fh,
                    ):
                        pids.update(int(x) for x in fh.read().split())
        return sorted(pids)

    # ---------------------------------------------------------------- reboot
    def power_off(self) -> None:
        """What a reboot does to this node: the kubelet, every container, the shims and
        containerd end (by PID and this node's cgroups only), every mount under the workdir goes
        (pod volumes, staging mounts, container root filesystems, sandbox namespaces) and the
        runtime state that lives on a tmpfs on a real machine (containerd's state, runc's root)
        is emptied. The kubelet's root, containerd's root and images stay, as on a disk."""
        if self.kubelet:
            self.kubelet.stop()
        if self.kube_proxy:
            self.kube_proxy.stop()
        tasks = self._task_ids()  # before their shims die and containerd drops their state
        self._past_task_ids.update(tasks)
        self._kill_cgroup_pids()
        self._kill_shims()
        if self.containerd:
            self.containerd.stop()
        self._kill_shims()
        self._unmount_all()
        self._remove_shim_sockets(tasks)  # /run is a tmpfs
        for d in (self.ctd_state, os.path.join(self.workdir, "runc")):
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(self.ctd_state)
        log(f"node {self.name} powered off")

    def power_on(self) -> None:
        """containerd, then the kubelet, with the configuration of start()."""
        self._start_containerd()
        self._start_kubelet()
        self._start_kube_proxy()
        log(f"node {self.name} powered on")

    # ---------------------------------------------------------------- stop
    def stop(self) -> list[str]:
        """Tear everything down; return what could not be cleaned (empty = clean)."""
        problems: list[str] = []
        started = time.monotonic()

        def step(what: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as exc:
                problems.append(f"{what}: {exc}")
                log(f"teardown {what}: {exc}")

        step("static pods", self._drain_pods)
        step("kubelet", lambda: self.kubelet and self.kubelet.stop())
        step("kube-proxy", lambda: self.kube_proxy and self.kube_proxy.stop())
        shim_ids = sorted(self._past_task_ids.union(self._task_ids()))
        step("pod processes", self._kill_cgroup_pids)
        step("shims", self._kill_shims)
        step("containerd", lambda: self.containerd and self.containerd.stop())
        step("shims after containerd", self._kill_shims)
        step("mounts", self._unmount_all)
        step("netns", self._delete_netns)
        step("cgroups", self._remove_cgroups)
        step("sysctls", self._restore_sysctls)
        step("host leftovers", lambda: self._host_leftovers(shim_ids))
        problems += self.leftovers()
        log(f"node {self.name} torn down in {time.monotonic() - started:.1f}s"
            + (f" with problems: {problems}" if problems else ", clean"))  # fmt: skip
        return problems

    def _drain_pods(self) -> None:
        """Let the kubelet stop its static pods (CNI DEL, unmounts) before it goes. Pods from an
        apiserver are the caller's to delete first; whatever still runs is killed after."""
        if not (
            self.kubelet and self.kubelet.alive() and self.containerd and self.containerd.alive()
        ):
            return
        if not (os.path.isdir(self.static_pod_dir) and os.listdir(self.static_pod_dir)):
            return
        self.remove_static_pods()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not self.cgroup_pids(), 60, "pod processes to stop", every=0.5)

    def _task_ids(self) -> list[str]:
        d = os.path.join(self.ctd_state, "io.containerd.runtime.v2.task", "k8s.io")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def _kill_cgroup_pids(self) -> None:
        for _ in range(20):
            pids = self.cgroup_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.25)
        raise RuntimeError(f"pids still in the pod cgroups: {self.cgroup_pids()}")

    def _our_shims(self) -> list[int]:
        """Shim processes of this node's containerd: our shim binary with our socket address."""
        shim = os.path.join(self.bin_dir, "containerd-shim-runc-v2")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
            except OSError:
                continue
            if exe == shim and self.ctd_sock.encode() in args:
                found.append(int(entry))
        return found

    def _kill_shims(self) -> None:
        for pid in self._our_shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not self._our_shims(), 10, "shims to exit", every=0.2)

    def _unmount_all(self) -> None:
        prefix = self.workdir + "/"
        for _ in range(5):
            points = [p for p in _mountinfo_points() if p == self.workdir or p.startswith(prefix)]
            if not points:
                return
            for p in reversed(points):  # newest (top-most) first
                if run("umount", p, check=False).returncode != 0:
                    run("umount", "-l", p, check=False)
        left = [p for p in _mountinfo_points() if p == self.workdir or p.startswith(prefix)]
        if left:
            raise RuntimeError(f"still mounted: {left}")

    def _delete_netns(self) -> None:
        if self._made_netns and os.path.exists(f"/run/netns/{self.netns}"):
            run("ip", "netns", "delete", self.netns)
        if os.path.exists(f"/sys/class/net/{self.host_if}"):  # the peer dies with the netns
            with contextlib.suppress(TimeoutError):
                wait_for(
                    lambda: not os.path.exists(f"/sys/class/net/{self.host_if}"), 5, "veth to go"
                )
            if os.path.exists(f"/sys/class/net/{self.host_if}"):
                run("ip", "link", "delete", self.host_if)

    def _remove_cgroups(self) -> None:
        left = []
        for root in self._made_cgroups:
            if not os.path.isdir(root):
                continue
            dirs = [dp for dp, _d, _f in os.walk(root)]
            for dp in sorted(dirs, key=lambda p: p.count("/"), reverse=True):
                for attempt in range(20):
                    try:
                        os.rmdir(dp)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if attempt == 19:
                            left.append(dp)
                        time.sleep(0.1)
        if left:
            raise RuntimeError(f"cgroups not removed: {left}")

    def _restore_sysctls(self) -> None:
        for key, value in self._saved_sysctls.items():
            path = f"/proc/sys/{key}"
            with open(path, encoding="ascii") as fh:
                if fh.read().strip() == value:
                    continue
            with open(path, "w", encoding="ascii") as fh:
                fh.write(value)

    def _remove_shim_sockets(self, task_ids: list[str]) -> None:
        # Shim sockets: /run/containerd/s/sha256(<containerd socket>/<namespace>/<task id>).
        for tid in task_ids:
            for debug in ("", "/debug"):
                h = hashlib.sha256(f"{self.ctd_sock}/k8s.io/{tid}{debug}".encode()).hexdigest()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHIM_SOCKETS, h))

    def _host_leftovers(self, task_ids: list[str]) -> None:
        self._remove_shim_sockets(task_ids)
        # libcni's result cache: <dir>/results/<network>-<container>-<ifname>, also for the
        # loopback network containerd adds to every sandbox (left when a sandbox is not torn
        # down through CNI, e.g. a pod that was never deleted).
        results = os.path.join(CNI_CACHE, "results")
        loopback = {f"cni-loopback-{tid}-lo" for tid in task_ids}
        if os.path.isdir(results):
            for f in os.listdir(results):
                if f.startswith(self.cni_network + "-") or f in loopback:
                    os.unlink(os.path.join(results, f))
        for link_dir in (CONTAINER_LOG_LINKS,):
            if os.path.isdir(link_dir):
                for f in os.listdir(link_dir):
                    p = os.path.join(link_dir, f)
                    if os.path.islink(p) and os.readlink(p).startswith(self.workdir + "/"):
                        os.unlink(p)
        if self in _live_nodes:
            _live_nodes.remove(self)
        if _live_nodes:
            return
        for path in HOST_PATHS:  # the last node of this process
            if _host_before.get(path, True):
                continue
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)

    def leftovers(self) -> list[str]:
        """What of this node is still on the machine (empty after a clean stop)."""
        out = []
        for proc in (self.containerd, self.kubelet, self.kube_proxy):
            if proc and proc.alive():
                out.append(f"process {proc.name} {proc.popen and proc.popen.pid}")
        out += [f"shim pid {p}" for p in self._our_shims()]
        out += [f"pod pid {p}" for p in self.cgroup_pids()]
        prefix = self.workdir + "/"
        out += [
            f"mount {p}" for p in _mountinfo_points() if p == self.workdir or p.startswith(prefix)
        ]
        if os.path.exists(f"/run/netns/{self.netns}"):
            out.append(f"netns {self.netns}")
        if os.path.exists(f"/sys/class/net/{self.host_if}"):
            out.append(f"link {self.host_if}")
        out += [f"cgroup {c}" for c in self._made_cgroups if os.path.exists(c)]
        for key, value in self._saved_sysctls.items():
            with open(f"/proc/sys/{key}", encoding="ascii") as fh:
                now = fh.read().strip()
            if now != value:
                out.append(f"sysctl {key} = {now}, was {value}")
        if not _live_nodes:
            out += [
                f"host path {p}"
                for p in HOST_PATHS
                if not _host_before.get(p, True) and os.path.lexists(p)
            ]
        return out

    def _save_state(self) -> None:
        """A record of what this node made, for a human cleaning up after a crash."""
        state = {
            "name": self.name, "netns": self.netns, "host_if": self.host_if,
            "cgroups": self._made_cgroups, "sysctls": self._saved_sysctls,
            "cni_network": self.cni_network,
            "pids": {p.name: p.popen.pid for p in (self.containerd, self.kubelet, self.kube_proxy)
                     if p and p.popen},
        }  # fmt: skip
        with (
            contextlib.suppress(OSError),
            open(os.path.join(self.workdir, "node-state.json"), "w") as fh,
        ):
            json.dump(state, fh, indent=1)

    def remove_workdir(self) -> None:
        """rm -r the workdir, refusing while anything is still mounted under it."""
        prefix = self.workdir + "/"
        if any(p == self.workdir or p.startswith(prefix) for p in _mountinfo_points()):
            raise RuntimeError(f"{self.workdir} still has mounts")
        shutil.rmtree(self.workdir, ignore_errors=False)
