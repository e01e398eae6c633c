"""The chart's probes on the DaemonSet pod do their job (issue 17, item 5).

- A hung driver: `STOWAGE_FAULTS=probe:answering@12=hang` (driver/faults.py) makes every CSI
  Probe from the twelfth on block for good: the sidecars' start-up Probes and the startup and
  readiness probes pass first (the pod is Ready), then the driver hangs, the livenessprobe
  sidecar's /healthz fails, and the kubelet restarts the driver container through the chart's
  liveness probe.
- A pool whose volumes directory is gone under the running driver: Probe answers not ready, and
  the readiness probe makes the pod NotReady within 30 s; back when the directory is.
- A damaged store: SQLite keeps serving a running driver from its WAL and cache, so the damage
  shows when the driver starts again (here: killed as a crash would, restarted by the kubelet).
  It refuses the store with one line, which the chart makes the termination message; the pod
  is NotReady within 30 s and stays so until `stowagectl pool rebuild`.
The StatefulSet pod of test_node.py keeps running through all of this."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kubernetes import client

from tests.e2e.cluster import NAMESPACE, wait
from tests.e2e.procs import REPO
from tests.e2e_node.conftest import World, read_text

DAEMONSET = "daemonset/stw-stowage-node"


def driver_status(w: World) -> client.V1ContainerStatus:
    return next(c for c in w.node_pod().status.container_statuses if c.name == "stowage-csi")


def not_ready_after(w: World, started: float, limit: float, what: str) -> float:
    """Seconds from `started` until the API shows the node pod NotReady."""

    def down() -> bool:
        pods = [p for p in w.pods("node") if not p.metadata.deletion_timestamp]
        return bool(pods) and not any(
            c.type == "Ready" and c.status == "True" for c in pods[0].status.conditions or []
        )

    wait(down, limit + 30, f"the node pod NotReady ({what})", every=0.5)
    took = time.monotonic() - started
    print(f"  {what}: node pod NotReady {took:.1f}s after")
    return took


def back(w: World) -> None:
    wait(w.registered, 240, "the node pod Ready and Stowage registered")


def test_a_hung_driver_is_restarted_by_the_kubelet_through_the_liveness_probe(
    world: World,
) -> None:
    w = world
    w.kubectl("-n", NAMESPACE, "set", "env", DAEMONSET, "-c", "stowage-csi",
              "STOWAGE_FAULTS=probe:answering@12=hang")  # fmt: skip
    try:
        wait(
            lambda: any(
                e.env and any(v.name == "STOWAGE_FAULTS" for v in e.env)
                for e in w.node_pod().spec.containers
            ),
            120,
            "the rolled pod with the fault armed",
        )
        pod = w.node_pod().metadata.name
        wait(lambda: w.ready("node"), 120, "the armed pod Ready before the hang")
        wait(lambda: driver_status(w).restart_count >= 1, 300,
             "the kubelet to restart the hung driver")  # fmt: skip
        events = w.e.core.list_namespaced_event(
            NAMESPACE, field_selector=f"involvedObject.name={pod}"
        ).items
        said = [f"{e.reason}: {e.message}" for e in events]
        assert any("Liveness probe failed" in s for s in said), said
        assert any("failed liveness probe, will be restarted" in s for s in said), said
        logs = "".join(read_text(f) for f in w.driver_log_files())
        assert "probe:answering" in logs  # the armed point, named at start-up
    finally:
        w.kubectl("-n", NAMESPACE, "set", "env", DAEMONSET, "-c", "stowage-csi",
                  "STOWAGE_FAULTS-")  # fmt: skip
    back(w)


def test_volumes_directory_gone_makes_the_node_pod_not_ready_within_30s(world: World) -> None:
    w = world
    volumes = os.path.join(w.e.cluster.pool_dir, "volumes")
    aside = volumes + ".gone"
    os.rename(volumes, aside)
    try:
        took = not_ready_after(w, time.monotonic(), 30, "volumes directory gone")
        assert took <= 30
    finally:
        os.rename(aside, volumes)
    back(w)


def test_a_damaged_store_keeps_the_restarted_driver_not_ready(world: World) -> None:
    w = world
    db = os.path.join(w.e.cluster.pool_dir, "meta.db")
    status = driver_status(w)
    restarts = status.restart_count
    cid = status.container_id.split("://", 1)[1]
    pid = int(w.node._ctr("tasks", "ls").stdout.split(cid, 1)[1].split()[0])
    assert pid in w.node.cgroup_pids()  # this run's container, nothing else
    with open(db, "r+b") as fh:  # as tests/hardening/test_pool_loss.py damages it
        size = os.path.getsize(db)
        fh.truncate(size // 2)
        fh.seek(size // 4)
        fh.write(os.urandom(8192))
    os.kill(pid, signal.SIGKILL)  # a crash: no checkpoint writes the WAL back over the damage
    started = time.monotonic()
    took = not_ready_after(w, started, 30, "store damaged, driver restarted")
    assert took <= 30

    def refused() -> str:
        st = driver_status(w)
        ended = st.state.terminated or st.last_state.terminated
        msg = (ended and ended.message) or ""
        return msg if st.restart_count > restarts and "metadata store" in msg else ""

    message = wait(refused, 120, "the restarted driver to refuse the store")
    assert "pool rebuild" in message, message
    assert not driver_status(w).ready
    # the documented recovery: stowagectl pool rebuild, then the driver starts again
    rebuilt = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "stowagectl"), "pool", "rebuild",
         "--pool-dir", w.e.cluster.pool_dir],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    w.kubectl("-n", NAMESPACE, "delete", "pod", w.node_pod().metadata.name)
    back(w)
