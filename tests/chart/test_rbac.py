"""RBAC: every API call each sidecar makes at its pinned version is granted, nothing more.

REQUIRED is the list of (apiGroup, resource, verbs, scope) per program, read from the
sidecars' sources at the pinned tags (client calls, informers, event recorders, leader
election) and cross-checked with their deploy/kubernetes/rbac*.yaml. "cluster" rules must be in
a ClusterRole bound with a ClusterRoleBinding; "namespace" rules in a Role of the release
namespace. The test asserts, per ServiceAccount, granted == union(REQUIRED of the programs that
run under it), so a missing verb and a superfluous one both fail.
"""

from __future__ import annotations

import pytest

from . import util
from .util import VALUE_SETS

Rule = tuple[str, str, str, str]  # (scope, apiGroup, resource, verb)

_G = "groupsnapshot.storage.k8s.io"
# volumeGroupSnapshots.enabled (the default): external-snapshotter v8.6.0 with
# --feature-gates=CSIVolumeGroupSnapshot=true, as its deploy/kubernetes RBAC lists them.
GROUP_SNAPSHOTTER = [
    ("cluster", _G, "volumegroupsnapshotclasses", ("get", "list", "watch")),
    ("cluster", _G, "volumegroupsnapshotcontents", ("get", "list", "watch", "update", "patch")),
    ("cluster", _G, "volumegroupsnapshotcontents/status", ("update", "patch")),
]
GROUP_CONTROLLER = [
    # a group's members become VolumeSnapshots it creates and deletes
    ("cluster", "snapshot.storage.k8s.io", "volumesnapshots", ("create", "delete")),
    ("cluster", _G, "volumegroupsnapshotclasses", ("get", "list", "watch")),
    (
        "cluster",
        _G,
        "volumegroupsnapshotcontents",
        ("create", "get", "list", "watch", "update", "delete", "patch"),
    ),
    ("cluster", _G, "volumegroupsnapshotcontents/status", ("patch",)),
    ("cluster", _G, "volumegroupsnapshots", ("get", "list", "watch", "update", "patch")),
    ("cluster", _G, "volumegroupsnapshots/status", ("update", "patch")),
]

# program -> [(scope, apiGroup, resource, verbs)]
REQUIRED: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = {
    # external-provisioner v6.3.0 (--node-deployment --enable-capacity --extra-create-metadata)
    "csi-provisioner": [
        # sig-storage-lib-external-provisioner v13: PV informer, Create, Delete, Patch (finalizers)
        ("cluster", "", "persistentvolumes", ("get", "list", "watch", "create", "patch", "delete")),
        # claim informer; Update to take ownership in node-deployment mode and for finalizers
        ("cluster", "", "persistentvolumeclaims", ("get", "list", "watch", "update")),
        ("cluster", "storage.k8s.io", "storageclasses", ("get", "list", "watch")),
        # a claim with a VolumeAttributesClass: Get, its parameters become mutable_parameters
        ("cluster", "storage.k8s.io", "volumeattributesclasses", ("get",)),
        # client-go record.EventSinkImpl: Create, then Patch for repeated events
        ("cluster", "", "events", ("create", "patch")),
        # restore: Get; source-protection finalizer: Update; orphan sweep: List/Watch
        (
            "cluster",
            "snapshot.storage.k8s.io",
            "volumesnapshots",
            ("get", "list", "watch", "update"),
        ),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", ("get",)),
        ("cluster", "storage.k8s.io", "csinodes", ("get", "list", "watch")),
        ("cluster", "", "nodes", ("get", "list", "watch")),
        # deletion waits for VolumeAttachments to go (it watches them for every driver)
        ("cluster", "storage.k8s.io", "volumeattachments", ("get", "list", "watch")),
        # --enable-capacity: CSIStorageCapacity informer + Create/Update/Delete in $NAMESPACE
        (
            "namespace",
            "storage.k8s.io",
            "csistoragecapacities",
            ("get", "list", "watch", "create", "update", "delete"),
        ),
        # --capacity-ownerref-level=1: owner.Lookup gets the Pod, takes its controller reference
        ("namespace", "", "pods", ("get",)),
    ],
    # external-snapshotter v8.6.0 csi-snapshotter --node-deployment
    # --feature-gates=CSIVolumeGroupSnapshot=true
    "csi-snapshotter": [
        ("cluster", "", "events", ("create", "patch")),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch")),
        (
            "cluster",
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            ("get", "list", "watch", "update", "patch"),
        ),
        (
            "cluster",
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents/status",
            ("update", "patch"),
        ),
        *GROUP_SNAPSHOTTER,
    ],
    # external-snapshot-metadata v1.1.0: its SnapshotMetadataService, each client's token and
    # access (TokenReview, SubjectAccessReview), VolumeSnapshots -> contents -> handles
    "csi-snapshot-metadata": [
        ("cluster", "cbt.storage.k8s.io", "snapshotmetadataservices", ("get", "list", "watch")),
        ("cluster", "authentication.k8s.io", "tokenreviews", ("create",)),
        ("cluster", "authorization.k8s.io", "subjectaccessreviews", ("create",)),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshots", ("get", "list")),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list")),
    ],
    "node-driver-registrar": [],  # talks to kubelet's plugin socket only
    "livenessprobe": [],  # talks to the CSI socket only
    # the driver, --mode node --watch-volume-attributes (driver/core/vacwatch.py): list and
    # watch PVs, get the VolumeAttributesClass a volume of its pool names
    "stowage-node": [
        ("cluster", "", "persistentvolumes", ("list", "watch")),
        ("cluster", "storage.k8s.io", "volumeattributesclasses", ("get",)),
    ],
    # the driver, --mode controller: answers from the request, no Kubernetes API access
    "stowage-controller": [],
    # external-resizer v2.2.x; MODIFY_VOLUME advertised, so its modify controller runs: a
    # VolumeAttributesClass informer (deploy/kubernetes/rbac.yaml grants get, list, watch),
    # PV patch (the new class) and claim status patch, already needed for resizing
    "csi-resizer": [
        ("cluster", "storage.k8s.io", "volumeattributesclasses", ("get", "list", "watch")),
        ("cluster", "", "persistentvolumes", ("get", "list", "watch", "patch")),
        ("cluster", "", "persistentvolumeclaims", ("get", "list", "watch")),
        ("cluster", "", "persistentvolumeclaims/status", ("patch",)),
        ("cluster", "", "pods", ("get", "list", "watch")),  # --handle-volume-inuse-error
        ("cluster", "", "events", ("create", "patch")),
    ],
    # csi-lib-utils v0.24.0 leaderelection: client-go LeaseLock Get/Create/Update, and a
    # LeaderElection event recorded in the lease's namespace
    "leader-election": [
        ("namespace", "coordination.k8s.io", "leases", ("get", "create", "update")),
        ("namespace", "", "events", ("create", "patch")),
    ],
    # external-snapshotter v8.6.0 snapshot-controller --enable-distributed-snapshotting
    "snapshot-controller": [
        ("cluster", "", "persistentvolumes", ("get", "list", "watch")),
        ("cluster", "", "persistentvolumeclaims", ("get", "list", "watch", "update")),
        ("cluster", "", "nodes", ("get", "list", "watch")),  # distributed snapshotting
        ("cluster", "", "events", ("create", "patch")),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch")),
        (
            "cluster",
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            ("get", "list", "watch", "create", "update", "patch", "delete"),
        ),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("patch",)),
        (
            "cluster",
            "snapshot.storage.k8s.io",
            "volumesnapshots",
            ("get", "list", "watch", "update", "patch"),
        ),
        ("cluster", "snapshot.storage.k8s.io", "volumesnapshots/status", ("update", "patch")),
        *GROUP_CONTROLLER,
        # always --leader-election=true; its events go through the cluster-wide events rule
        ("namespace", "coordination.k8s.io", "leases", ("get", "create", "update")),
    ],
}

# Which programs run under which ServiceAccount (suffix of its name), by container name.
PROGRAMS = {
    "node": {
        "stowage-csi": "stowage-node",
        "node-driver-registrar": "node-driver-registrar",
        "csi-provisioner": "csi-provisioner",
        "csi-snapshotter": "csi-snapshotter",
        "csi-snapshot-metadata": "csi-snapshot-metadata",  # with snapshotMetadata.enabled
        "liveness-probe": "livenessprobe",
    },
    "controller": {
        "stowage-csi": "stowage-controller",
        "csi-resizer": "csi-resizer",
        "liveness-probe": "livenessprobe",
        # only with backup targets: the node-independent snapshotter (docs/design.md)
        "csi-snapshotter": "csi-snapshotter",
    },
    "snapshot-controller": {"snapshot-controller": "snapshot-controller"},
}


# Containers only some value sets render: the snapshot-metadata sidecar (snapshotMetadata.enabled)
# and the controller's csi-snapshotter (backup.targets).
OPTIONAL: dict[str, set[str]] = {
    "node": {"csi-snapshot-metadata"},
    "controller": {"csi-snapshotter"},
    "snapshot-controller": set(),
}


def expand(programs: list[str]) -> set[Rule]:
    out: set[Rule] = set()
    for program in programs:
        for scope, group, resource, verbs in REQUIRED[program]:
            out |= {(scope, group, resource, verb) for verb in verbs}
    return out


def granted(docs: list[dict], sa_name: str, namespace: str) -> set[Rule]:
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    out: set[Rule] = set()
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == sa_name and s["namespace"] == namespace
            for s in b["subjects"]
        ):
            continue
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        if b["kind"] == "ClusterRoleBinding":
            assert ref["kind"] == "ClusterRole", "ClusterRoleBinding to a Role"
            role, scope = roles[("ClusterRole", None, ref["name"])], "cluster"
        else:
            assert ref["kind"] == "Role", (
                f"RoleBinding {b['metadata']['name']} refers to a ClusterRole"
            )
            assert b["metadata"]["namespace"] == namespace
            role, scope = roles[("Role", namespace, ref["name"])], "namespace"
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/URLs
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add((scope, group, resource, verb))
    return out


def component_programs(docs: list[dict], component: str, leader_election: bool) -> list[str]:
    workloads = [
        d
        for d in docs
        if d["kind"] in ("DaemonSet", "Deployment")
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(workloads) == 1, component
    names = list(util.containers(workloads[0]))
    assert set(names) <= set(PROGRAMS[component]), names
    assert set(PROGRAMS[component]) - set(names) <= OPTIONAL[component], names
    programs = [PROGRAMS[component][n] for n in names]
    if leader_election:
        programs.append("leader-election")
    return programs


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_is_exactly_what_each_sidecar_needs(render, name: str) -> None:
    values = VALUE_SETS[name]
    docs = render(values)
    ns = "stowage-system"
    replicas = values.get("controller", {}).get("replicas", 1)
    components = {"node": False, "controller": replicas > 1}
    if values.get("snapshotController", {}).get("enabled", True):
        components["snapshot-controller"] = False  # its leases are part of its REQUIRED entry
    sas = {d["metadata"]["name"] for d in util.by_kind(docs, "ServiceAccount")}
    assert sas == {f"{util.RELEASE}-{c}" for c in components}, sas
    for component, leader_election in components.items():
        sa = f"{util.RELEASE}-{component}"
        want = expand(component_programs(docs, component, leader_election))
        if not values.get("volumeGroupSnapshots", {}).get("enabled", True):
            want -= {
                (scope, group, resource, verb)
                for scope, group, resource, verbs in GROUP_SNAPSHOTTER + GROUP_CONTROLLER
                for verb in verbs
            }
        have = granted(docs, sa, ns)
        missing, extra = want - have, have - want
        assert not missing, f"{sa} lacks {sorted(missing)}"
        assert not extra, f"{sa} has more than it needs: {sorted(extra)}"
        workload = next(
            d
            for d in docs
            if d["kind"] in ("DaemonSet", "Deployment")
            and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] == sa


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards_and_no_secrets(render, name: str) -> None:
    for role in render(VALUE_SETS[name]):
        if role["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field] and not any("*" in x for x in rule[field]), (
                    role,
                    rule,
                )
            assert "secrets" not in rule["resources"], role["metadata"]["name"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_leases_only_with_leader_election(render) -> None:
    one = granted(render(), f"{util.RELEASE}-controller", "stowage-system")
    two = granted(
        render(VALUE_SETS["controller-replicas-2"]), f"{util.RELEASE}-controller", "stowage-system"
    )
    assert not any(r[2] == "leases" for r in one)
    assert ("namespace", "coordination.k8s.io", "leases", "update") in two
    node = granted(render(), f"{util.RELEASE}-node", "stowage-system")
    assert not any(r[2] == "leases" for r in node), "node-local sidecars never elect a leader"


def test_granted_detects_a_missing_verb(render) -> None:
    """The comparison must be able to fail: drop one verb and the node SA falls short."""
    docs = [dict(d) for d in render()]
    for i, d in enumerate(docs):
        if d["kind"] == "Role" and d["metadata"]["name"].endswith("node-provisioner"):
            rules = [dict(r) for r in d["rules"]]
            rules[0] = {**rules[0], "verbs": [v for v in rules[0]["verbs"] if v != "delete"]}
            docs[i] = {**d, "rules": rules}
    have = granted(docs, f"{util.RELEASE}-node", "stowage-system")
    want = expand(component_programs(docs, "node", False))
    assert want - have == {("namespace", "storage.k8s.io", "csistoragecapacities", "delete")}
