"""deploy/examples/ applied with the real kubectl against the chart-deployed driver, as
deploy/examples/README.md walks through them (issue 17).

Every step is the README's own command (`kubectl apply -f …`, `kubectl get`, `kubectl exec …
cat /data/log.txt`, `kubectl patch pvc`, `kubectl delete -f .`), checked for what the README says
it shows. Two departures: `kubectl delete -f .` gets `--grace-period=1` (the examples' shells
ignore SIGTERM and would take their 30 s each), and the expansion walkthrough runs on the
StatefulSet's xfs claim instead of the ext4 `stowage-data`: this machine's sandbox withholds
CAP_SYS_RESOURCE, without which the kernel refuses to grow a mounted ext4 (EXT4_IOC_RESIZE_FS).
"""

from __future__ import annotations

import json
import os
from typing import Any

from tests.e2e.cluster import DRIVER, NODE, TOPOLOGY_KEY, wait
from tests.e2e_node.conftest import World

EXAMPLES = "deploy/examples"


def ex(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def get(w: World, *args: str) -> Any:
    return json.loads(w.kubectl("get", *args, "-o", "json"))


def running(w: World, pod: str) -> bool:
    return bool(get(w, "pod", pod)["status"].get("phase") == "Running")


def test_examples_as_the_readme_walks_through_them(world: World) -> None:
    w = world
    # 01: a StorageClass of one's own
    w.kubectl("apply", "-f", ex("01-storageclass.yaml"))
    sc = get(w, "storageclass", "stowage-btrfs-retain")
    assert sc["provisioner"] == DRIVER and sc["reclaimPolicy"] == "Retain"

    # 02 + 03: Pending until the pod is scheduled, then Bound; the PV names the pod's node
    w.kubectl("apply", "-f", ex("02-pvc.yaml"), "-f", ex("03-pod.yaml"))
    wait(lambda: running(w, "stowage-app"), 180, "stowage-app Running")
    assert get(w, "pvc", "stowage-data")["status"]["phase"] == "Bound"
    pv = get(w, "pv", get(w, "pvc", "stowage-data")["spec"]["volumeName"])
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0] == {
        "key": TOPOLOGY_KEY,
        "operator": "In",
        "values": [NODE],
    }
    first = w.kubectl("exec", "stowage-app", "--", "cat", "/data/log.txt")
    assert len(first.splitlines()) == 1, first

    # 04: a StatefulSet, claims labelled by its selector; a deleted pod comes back with its data
    w.kubectl("apply", "-f", ex("04-statefulset.yaml"))
    pods = [f"stowage-web-{i}" for i in range(3)]
    wait(lambda: all(running(w, p) for p in pods), 300, "stowage-web-0..2 Running")
    claims = get(w, "pvc", "-l", "app=stowage-web")["items"]
    assert sorted(c["metadata"]["name"] for c in claims) == [f"data-{p}" for p in pods]
    uid = get(w, "pod", "stowage-web-0")["metadata"]["uid"]
    w.kubectl("delete", "pod", "stowage-web-0")
    wait(
        lambda: (
            get(w, "pod", "stowage-web-0")["metadata"]["uid"] != uid and running(w, "stowage-web-0")
        ),
        180,
        "stowage-web-0 back",
    )
    hosts = w.kubectl("exec", "stowage-web-0", "--", "cat", "/data/hosts.txt").split()
    assert hosts == ["stowage-web-0", "stowage-web-0"], hosts

    # 05 + 06: a raw block device at /dev/xvda
    w.kubectl("apply", "-f", ex("05-block-pvc.yaml"), "-f", ex("06-block-pod.yaml"))
    wait(lambda: running(w, "stowage-block-app"), 180, "stowage-block-app Running")
    listing = w.kubectl("exec", "stowage-block-app", "--", "ls", "-l", "/dev/xvda")
    assert listing.startswith("b"), listing  # a block device

    # 07: a snapshot, READYTOUSE true; 08: restored from it; 09: a clone
    w.kubectl("apply", "-f", ex("07-volumesnapshot.yaml"))
    wait(
        lambda: get(w, "volumesnapshot", "stowage-data-snap").get("status", {}).get("readyToUse"),
        120,
        "stowage-data-snap readyToUse",
    )
    for manifest, pod in (("08-restore-pvc.yaml", "stowage-restore-check"),
                          ("09-clone-pvc.yaml", "stowage-clone-check")):  # fmt: skip
        w.kubectl("apply", "-f", ex(manifest))
        wait(lambda p=pod: running(w, p), 180, f"{pod} Running")
        got = w.kubectl("exec", pod, "--", "cat", "/data/log.txt")
        assert got == first, (pod, got, first)

    # Expansion (on data-stowage-web-0, xfs: see the module docstring), the pod keeps running
    w.kubectl("patch", "pvc", "data-stowage-web-0", "--type", "merge",
              "-p", '{"spec":{"resources":{"requests":{"storage":"3Gi"}}}}')  # fmt: skip
    wait(
        lambda: get(w, "pvc", "data-stowage-web-0")["status"]["capacity"]["storage"] == "3Gi",
        120,
        "data-stowage-web-0 CAPACITY 3Gi",
    )
    df = w.kubectl("exec", "stowage-web-0", "--", "df", "-k", "/data").splitlines()[-1]
    assert int(df.split()[1]) > 2 * (1 << 20), df  # KiB: more than the 2Gi it had
    assert running(w, "stowage-web-0")

    # Clean up: Delete-class claims free their space, Retain classes keep their PVs
    # (--grace-period=1: the examples' shells ignore SIGTERM, 30 s each otherwise;
    # --ignore-not-found: examples this walkthrough does not apply, such as backups)
    w.kubectl("delete", "-f", EXAMPLES + "/", "--grace-period=1", "--ignore-not-found",
              "--wait=true", "--timeout=180s")  # fmt: skip
    for p in get(w, "pvc", "-l", "app=stowage-web")["items"]:  # a StatefulSet's claims stay
        w.kubectl("delete", "pvc", p["metadata"]["name"])
    retained = {"stowage-block"}

    def only_retained() -> bool:
        pvs = get(w, "pv")["items"]
        return {p["spec"]["claimRef"]["name"] for p in pvs} == retained and all(
            p["status"]["phase"] == "Released" for p in pvs
        )

    wait(only_retained, 120, "only the Retain claim's PV left, Released")
    w.kubectl("delete", "pv", "--all")  # the retained volume stays in the pool
