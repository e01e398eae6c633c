"""`helm upgrade` and `helm uninstall` + `helm install` under a pod that keeps writing (issue
17, item 4). Runs last in the session: it replaces the chart's pods.

The writer pod appends one 16-byte record (its sequence number) to a journal with O_SYNC-like
`dd conv=fsync` every 0.1 s and prints, from inside the pod, every failed write and each new
longest gap between two completed writes (/proc/uptime, 10 ms resolution)."""

from __future__ import annotations

import os

from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from tests.e2e.cluster import NAMESPACE, wait
from tests.e2e_node.conftest import NS, World, read_text
from tests.e2e_node.test_node import (
    claim_volume,
    container,
    delete_pod,
    latest,
    make_pod,
    phase,
    pod_spec,
    pv_of,
)

WRITER = """
cd /data
head -c 4194304 /dev/urandom > blob && sync && echo sum=$(sha256sum blob | cut -d' ' -f1)
up() { read u _ < /proc/uptime; echo "${u%.*}${u#*.}"; }
i=0; last=$(up); max=0
echo started=1
while true; do
  if echo "$i" | dd of=journal bs=16 seek=$i conv=notrunc,sync,fsync 2>/tmp/err; then
    now=$(up); gap=$((now - last)); last=$now; i=$((i+1))
    if [ "$gap" -gt "$max" ]; then max=$gap; echo "maxgap_cs=$max at=$i"; fi
    echo "written=$i" > /tmp/written
  else
    echo "write_error=$i $(cat /tmp/err)"
  fi
  usleep 100000
done
"""


def pool_loops(w: World) -> dict[str, str]:
    """Loop device → backing image, for this run's pool."""
    prefix = w.e.cluster.pool_dir + os.sep
    return {
        lo.device: lo.backing_file
        for lo in LoopManager(SubprocessRunner()).devices()
        if lo.backing_file.startswith(prefix)
    }


def errors(w: World, pod: str) -> list[str]:
    files = _logs(w, pod)
    return [ln for f in files for ln in read_text(f).splitlines() if "write_error=" in ln]


def max_gap(w: World, pod: str) -> float:
    gaps = [
        int(ln.split("maxgap_cs=", 1)[1].split()[0])
        for f in _logs(w, pod)
        for ln in read_text(f).splitlines()
        if "maxgap_cs=" in ln
    ]
    return max(gaps, default=0) / 100


def written(w: World, pod: str) -> int:
    return int(w.kubectl("exec", pod, "--", "cat", "/tmp/written").split("=")[1])


def _logs(w: World, pod: str) -> list[str]:
    return w.log_files(pod, "main", namespace=NS)


def start_writer(w: World) -> str:
    e = w.e
    e.create_claim("steady", "256Mi", "stowage", namespace=NS)
    ctr = container(WRITER, volumeMounts=[{"name": "data", "mountPath": "/data"}])
    make_pod(e, "steady", pod_spec(ctr, [claim_volume("steady")]))
    wait(lambda: phase(e, "steady") == "Running" and latest(w, "steady", "sum", "started"), 180,
         "the writer pod writing")  # fmt: skip
    wait(lambda: written(w, "steady") > 10, 60, "ten writes")
    return latest(w, "steady", "sum")["sum"]


def journal_ok(w: World, pod: str) -> int:
    """The journal's records are 0, 1, 2, … with none missing; returns how many."""
    raw = w.kubectl("exec", pod, "--", "cat", "/data/journal").encode()
    records = [raw[i : i + 16].rstrip(b"\0").strip() for i in range(0, len(raw), 16)]
    assert records == [str(i).encode() for i in range(len(records))], records[:5]
    return len(records)


def test_helm_upgrade_rolls_the_daemonset_under_a_writing_pod(world: World) -> None:
    w = world
    start_writer(w)
    loops = pool_loops(w)
    old = w.node_pod()
    before = written(w, "steady")
    w.upgrade("logLevel=info")  # a changed value: the DaemonSet's pod template changes
    wait(
        lambda: w.node_pod().metadata.uid != old.metadata.uid and w.registered(),
        240,
        "the rolled node pod Ready and registered",
    )
    args = w.node_pod().spec.containers[0].args
    assert "--log-level=info" in args, args
    wait(lambda: written(w, "steady") > before + 50, 60, "writes after the roll")
    assert not errors(w, "steady"), errors(w, "steady")
    gap = max_gap(w, "steady")
    print(f"  helm upgrade: longest gap between two writes inside the pod {gap:.2f}s")
    assert gap <= 2.0, gap  # the bound
    assert pool_loops(w) == loops  # no loop device detached or replaced
    assert phase(w.e, "steady") == "Running"


def test_helm_uninstall_keeps_the_data_and_install_serves_it_again(world: World) -> None:
    w = world
    e = w.e
    pv = pv_of(e, "steady")
    image = os.path.join(e.cluster.pool_dir, "volumes", pv.spec.csi.volume_handle + ".img")
    sum_before = latest(w, "steady", "sum")["sum"]
    w.helm("uninstall", "stw", "-n", NAMESPACE)
    wait(lambda: not e.core.list_namespaced_pod(NAMESPACE).items, 180, "the chart's pods gone")
    assert os.path.exists(image)
    count = written(w, "steady")
    wait(lambda: written(w, "steady") > count + 10, 60, "the pod writing without the driver")
    w.install()
    w.wait_ready()
    wait(w.registered, 120, "Stowage registered again")
    # the writer goes (unpublish, unstage through the new driver); a reader gets the volume
    delete_pod(e, "steady")
    wait(lambda: image not in pool_loops(w).values(), 60, "the volume unstaged (loop detached)")
    reader = container(
        "echo sum=$(sha256sum /data/blob | cut -d' ' -f1) && echo ok=1 && sleep 100000",
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
    )
    make_pod(e, "again", pod_spec(reader, [claim_volume("steady")]))
    wait(lambda: phase(e, "again") == "Running" and latest(w, "again", "ok"), 180,
         "the reader on the reinstalled driver")  # fmt: skip
    assert latest(w, "again", "sum")["sum"] == sum_before
    n = journal_ok(w, "again")
    assert n > count, (n, count)
    delete_pod(e, "again")
    e.core.delete_namespaced_persistent_volume_claim("steady", NS)
    wait(lambda: not os.path.exists(image), 120, "the volume deleted by the reinstalled driver")
