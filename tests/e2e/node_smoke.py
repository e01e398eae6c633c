"""Standalone node smoke: containerd + runc + CNI + engine-less images + kubelet, no apiserver.

    sudo python -m tests.e2e.node_smoke [--keep]

Builds nothing: run tests/e2e/tools/build-node.sh first. Starts a Node (tests/e2e/node.py) in a
fresh temporary directory, gives its kubelet a static pod of the busybox image that writes its
pod IP and a marker into a hostPath under that directory, waits for the file, checks the pod
got an address from the CNI bridge, then tears down and checks that no process, mount, network
namespace or cgroup of the node is left. Exit 0 only when all of that holds.

It also starts Stowage's node driver on a socket in the workdir with the registrar stand-in
(tests/e2e/registrar.py) and checks the kubelet's plugin watcher takes it up: GetInfo, the
driver's NodeGetInfo, then NotifyRegistrationStatus. Standalone, the kubelet has no Node object
to annotate, so that status is "not registered: ... error getting kube client" - the expected
answer here; with an apiserver it is registered.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.node import BUSYBOX_IMAGE, Node, log, wait_for
from tests.e2e.registrar import Registrar

DRIVER = "stowage.csi.io"


def static_pod(out_dir: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "smoke", "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "writer",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": [
                        "/bin/sh",
                        "-c",
                        "ip -4 -o addr show dev eth0 | awk '{print $4}' > /out/ip"
                        " && echo stowage-node-smoke > /out/done.tmp && mv /out/done.tmp /out/done"
                        " && exec sleep 3600",
                    ],
                    "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                }
            ],
            "volumes": [{"name": "out", "hostPath": {"path": out_dir, "type": "Directory"}}],
        },
    }


@dataclass
class Plugin:
    driver: subprocess.Popen[bytes] | None = None
    registrar: Registrar | None = None

    def stop(self) -> None:
        if self.registrar:
            self.registrar.stop()
        if self.driver and self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(30)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()


def plugin_registration(node: Node, name: str, plugin: Plugin) -> None:
    sock = os.path.join(node.workdir, "csi.sock")
    pool = os.path.join(node.workdir, "pool")
    os.makedirs(pool)
    exe = os.path.join(os.path.dirname(sys.executable), "stowage-csi")
    with open(os.path.join(node.logs, "driver.log"), "ab") as out:
        plugin.driver = subprocess.Popen(
            [exe, "--endpoint", f"unix://{sock}", "--mode", "node", "--node-id", name,
             "--pool-dir", pool, "--metrics-address", ""],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for(lambda: os.path.exists(sock), 30, "the driver's socket")
    registrar = plugin.registrar = Registrar(node.kubelet_root, DRIVER, sock).start()
    wait_for(registrar.notified.is_set, 30, "the kubelet's NotifyRegistrationStatus")
    registered, error = registrar.status or (False, "")
    log(f"plugin registration: registered={registered} error={error!r}")
    if not registered and "kube client" not in error:
        raise AssertionError(f"unexpected registration status: {registered} {error}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keep", action="store_true", help="keep the workdir (logs) after a clean run")
    ap.add_argument("--name", default="smoke-node")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("node_smoke needs root")
    workdir = tempfile.mkdtemp(prefix="stowage-node-")
    log(f"workdir {workdir}")
    out_dir = os.path.join(workdir, "hostpath")
    os.makedirs(out_dir)
    node = Node(workdir, args.name, kubeconfig=None)
    ok = False
    plugin = Plugin()
    started = time.monotonic()
    try:
        node.start()
        t0 = time.monotonic()
        node.add_static_pod(static_pod(out_dir))
        done = os.path.join(out_dir, "done")
        wait_for(lambda: os.path.exists(done), 120, "the static pod to write its file", every=0.5)
        marker = Path(done).read_text().strip()
        log(f"pod ran: {done} = {marker!r}, {time.monotonic() - t0:.1f}s after the manifest")
        pod_ip = Path(out_dir, "ip").read_text().strip().split("/")[0]
        if ipaddress.ip_address(pod_ip) not in ipaddress.ip_network(node.pod_subnet):
            raise AssertionError(f"pod IP {pod_ip} is not in the CNI subnet {node.pod_subnet}")
        log(f"pod IP {pod_ip} from the CNI bridge ({node.pod_subnet})")
        pods = wait_for(
            lambda: [p for p in node.kubelet_pods() if p["status"].get("phase") == "Running"],
            30,
            "the kubelet to report the pod Running",
        )
        log(f"kubelet /pods: {[(p['metadata']['name'], p['status']['phase']) for p in pods]}")
        plugin_registration(node, args.name, plugin)
        ok = True
    except Exception as exc:
        log(f"FAILED: {exc}")
        for proc in (node.containerd, node.kubelet):
            if proc:
                log(f"--- last lines of {proc.log_path}\n{proc.tail(25)}")
    finally:
        plugin.stop()
        problems = node.stop()
    if problems:
        log(f"teardown left: {problems}")
        ok = False
    if ok and not args.keep:
        node.remove_workdir()
    else:
        log(f"kept {workdir}")
    log(f"{'PASS' if ok else 'FAIL'} in {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
