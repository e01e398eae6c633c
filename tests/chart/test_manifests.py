"""Rendered-manifest wiring: sockets, registration, propagation, privileges, flags, images."""

from __future__ import annotations

import posixpath

import pytest

from . import util
from .util import VALUE_SETS

DRIVER = "stowage.csi.io"
ENDPOINT = "unix:///csi/csi.sock"

PINNED = {
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
    "snapshot-controller": "registry.k8s.io/sig-storage/snapshot-controller:v8.6.0",
    "csi-snapshot-metadata": "registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.1.0",
}

# Flags each program defines at its pinned tag (cmd/*/main.go, csi-lib-utils v0.24.0
# standardflags.RegisterCommonFlags, klog's -v). A typo in the chart fails here instead of
# crash-looping the pod.
COMMON = {
    "kubeconfig",
    "csi-address",
    "leader-election",
    "leader-election-namespace",
    "leader-election-lease-duration",
    "leader-election-renew-deadline",
    "leader-election-retry-period",
    "leader-election-labels",
    "kube-api-qps",
    "kube-api-burst",
    "http-endpoint",
    "metrics-address",
    "metrics-path",
    "version",
    "automaxprocs",
    "v",
}
KNOWN_FLAGS = {
    "csi-provisioner": COMMON
    | {
        "master",
        "volume-name-prefix",
        "volume-name-uuid-length",
        "retry-interval-start",
        "retry-interval-max",
        "worker-threads",
        "cloning-protection-threads",
        "snapshot-orphan-sweep-interval",
        "capacity-threads",
        "timeout",
        "strict-topology",
        "immediate-topology",
        "extra-create-metadata",
        "enable-pprof",
        "default-fstype",
        "kube-api-capacity-qps",
        "kube-api-capacity-burst",
        "enable-capacity",
        "capacity-for-immediate-binding",
        "capacity-poll-interval",
        "capacity-ownerref-level",
        "node-deployment",
        "node-deployment-immediate-binding",
        "node-deployment-base-delay",
        "node-deployment-max-delay",
        "controller-publish-readonly",
        "prevent-volume-mode-conversion",
        "feature-gates",
    },
    "csi-resizer": COMMON
    | {
        "master",
        "resync-period",
        "workers",
        "extra-modify-metadata",
        "timeout",
        "retry-interval-start",
        "retry-interval-max",
        "handle-volume-inuse-error",
        "feature-gates",
    },
    "csi-snapshotter": COMMON
    | {
        "resync-period",
        "snapshot-name-prefix",
        "snapshot-name-uuid-length",
        "worker-threads",
        "timeout",
        "extra-create-metadata",
        "retry-interval-start",
        "retry-interval-max",
        "node-deployment",
        "groupsnapshot-name-prefix",
        "groupsnapshot-name-uuid-length",
        "feature-gates",
    },
    "snapshot-controller": {
        "kubeconfig",
        "resync-period",
        "version",
        "worker-threads",
        "leader-election",
        "leader-election-namespace",
        "leader-election-lease-duration",
        "leader-election-renew-deadline",
        "leader-election-retry-period",
        "kube-api-qps",
        "kube-api-burst",
        "http-endpoint",
        "metrics-path",
        "retry-interval-start",
        "retry-interval-max",
        "enable-distributed-snapshotting",
        "prevent-volume-mode-conversion",
        "retry-crd-interval-max",
        "feature-gates",
        "v",
    },
    # external-snapshot-metadata v1.1.0 (pkg/sidecar/sidecar.go) and klog
    "csi-snapshot-metadata": {
        "kubeconfig",
        "csi-address",
        "version",
        "timeout",
        "port",
        "tls-cert",
        "tls-key",
        "max-streaming-duration-min",
        "kube-api-qps",
        "kube-api-burst",
        "http-endpoint",
        "metrics-path",
        "v",
    },
    "node-driver-registrar": {
        "connection-timeout",
        "timeout",
        "csi-address",
        "plugin-registration-path",
        "kubelet-registration-path",
        "health-port",
        "http-endpoint",
        "version",
        "mode",
        "enable-pprof",
        "v",
    },
    "liveness-probe": {
        "probe-timeout",
        "csi-address",
        "health-port",
        "metrics-address",
        "http-endpoint",
        "metrics-path",
        "v",
    },
    # the driver's own CLI (driver/cli.py)
    "stowage-csi": {
        "backup-target",
        "backup-key-file",
        "backup-cluster-id",
        "backup-verify-interval",
        "endpoint",
        "mode",
        "node-id",
        "pool-dir",
        "pool-require-mountpoint",
        "no-pool-require-mountpoint",
        "trash-grace",
        "store-backup-interval",
        "metrics-address",
        "log-level",
        "log-format",
        "max-volumes-per-node",
        "reserved-bytes",
        "watch-volume-attributes",
    },
}


def node_ds(docs: list[dict]) -> dict:
    return util.one(docs, "DaemonSet", "node")


def controller(docs: list[dict]) -> dict:
    return util.one(docs, "Deployment", "controller")


def all_workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]


def volumes(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}


def mounts(container: dict) -> dict[str, dict]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def values_of(name: str) -> dict:
    return VALUE_SETS[name]


def kubelet_dir(name: str) -> str:
    return values_of(name).get("kubeletDir", "/var/lib/kubelet")


def pool_dir(name: str) -> str:
    return values_of(name).get("node", {}).get("poolDir", "/var/lib/stowage")


def test_csidriver(render) -> None:
    csidriver = util.one(render(), "CSIDriver")
    assert csidriver["metadata"]["name"] == DRIVER
    assert csidriver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
        "storageCapacity": True,
    }


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_socket_user_agrees_with_the_driver_endpoint(render, name: str) -> None:
    docs = render(values_of(name))
    sock = ENDPOINT.removeprefix("unix://")
    for workload in all_workloads(docs):
        cs = util.containers(workload)
        if "stowage-csi" not in cs:
            continue  # snapshot-controller talks to the API server only
        driver = util.flags(cs["stowage-csi"])
        assert driver["endpoint"] == ENDPOINT
        drv_mount = mounts(cs["stowage-csi"])["socket-dir"]
        assert drv_mount["mountPath"] == posixpath.dirname(sock)
        users = 0
        for cname, c in cs.items():
            f = util.flags(c)
            if cname == "stowage-csi":
                continue
            assert f.get("csi-address") == sock, f"{cname}: --csi-address {f.get('csi-address')}"
            m = mounts(c).get("socket-dir")
            assert m is not None and m["mountPath"] == drv_mount["mountPath"], cname
            users += 1
        assert users == len(cs) - 1 >= 2
    # the node pod's socket directory is the host directory kubelet registers
    ds = node_ds(docs)
    host_dir = volumes(ds)["socket-dir"]["hostPath"]
    assert host_dir == {
        "path": f"{kubelet_dir(name)}/plugins/{DRIVER}",
        "type": "DirectoryOrCreate",
    }
    # the controller's socket is private to the pod
    assert volumes(controller(docs))["socket-dir"] == {"name": "socket-dir", "emptyDir": {}}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_kubelet_registration(render, name: str) -> None:
    ds = node_ds(render(values_of(name)))
    kd = kubelet_dir(name)
    reg = util.containers(ds)["node-driver-registrar"]
    f = util.flags(reg)
    assert f["kubelet-registration-path"] == f"{kd}/plugins/{DRIVER}/csi.sock"
    # kubelet's path must be where the host directory of the driver socket is
    assert (
        posixpath.dirname(f["kubelet-registration-path"])
        == volumes(ds)["socket-dir"]["hostPath"]["path"]
    )
    assert volumes(ds)["registration-dir"]["hostPath"] == {
        "path": f"{kd}/plugins_registry",
        "type": "Directory",
    }
    assert mounts(reg)["registration-dir"]["mountPath"] == "/registration"
    probe = reg["livenessProbe"]["exec"]["command"]
    assert f"--kubelet-registration-path={f['kubelet-registration-path']}" in probe
    assert "--mode=kubelet-registration-probe" in probe


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_node_driver_flags_and_host_paths(render, name: str) -> None:
    ds = node_ds(render(values_of(name)))
    drv = util.containers(ds)["stowage-csi"]
    f = util.flags(drv)
    node_values = values_of(name).get("node", {})
    assert f["mode"] == "node"
    assert f["node-id"] == "$(NODE_NAME)"
    assert env(drv)["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert f["pool-dir"] == pool_dir(name)
    assert f["log-level"] == values_of(name).get("logLevel", "info")
    assert f["log-format"] == values_of(name).get("logFormat", "json")
    for key, flag in (
        ("maxVolumesPerNode", "max-volumes-per-node"),
        ("reservedBytes", "reserved-bytes"),
    ):
        if node_values.get(key):
            assert f[flag] == str(node_values[key])
        else:
            assert flag not in f
    vols, ms = volumes(ds), mounts(drv)
    # host path == container path: kubelet hands the driver host paths
    assert (
        vols["kubelet-dir"]["hostPath"]["path"]
        == ms["kubelet-dir"]["mountPath"]
        == kubelet_dir(name)
    )
    # never DirectoryOrCreate: a disk that failed to mount must not become an empty pool on /
    assert vols["pool-dir"]["hostPath"] == {"path": pool_dir(name), "type": "Directory"}
    require = node_values.get("poolRequireMountpoint", True)
    assert ("pool-require-mountpoint" in f) is require
    assert ("no-pool-require-mountpoint" in f) is (not require)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert drv[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}, probe
    assert drv["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert ms["pool-dir"]["mountPath"] == pool_dir(name)
    assert vols["dev-dir"]["hostPath"]["path"] == ms["dev-dir"]["mountPath"] == "/dev"
    # ModifyVolume's I/O limits go into other pods' cgroups: the host's hierarchy over the
    # container's own (driver/host/cgroups.py takes the last mount at a mount point).
    assert vols["cgroup-dir"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert ms["cgroup-dir"]["mountPath"] == "/sys/fs/cgroup"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_mount_propagation_exactly_as_intended(render, name: str) -> None:
    docs = render(values_of(name))
    seen = {}
    for workload in all_workloads(docs):
        for cname, c in util.containers(workload).items():
            for m in c.get("volumeMounts", []):
                if "mountPropagation" in m:
                    seen[(workload["kind"], cname, m["name"])] = m["mountPropagation"]
    assert seen == {
        ("DaemonSet", "stowage-csi", "kubelet-dir"): "Bidirectional",
        ("DaemonSet", "stowage-csi", "pool-dir"): "Bidirectional",
    }


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_privileges_exactly_as_intended(render, name: str) -> None:
    docs = render(values_of(name))
    for workload in all_workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), f"{workload['metadata']['name']}: {key}"
        for cname, c in util.containers(workload).items():
            sc = c["securityContext"]
            if workload["kind"] == "DaemonSet" and cname == "stowage-csi":
                assert sc["privileged"] is True and sc["runAsUser"] == 0
                continue
            assert not sc.get("privileged"), cname
            assert sc["allowPrivilegeEscalation"] is False, cname
            assert sc["capabilities"] == {"drop": ["ALL"]}, cname
            assert sc["readOnlyRootFilesystem"] is True, cname
            assert "add" not in sc["capabilities"], cname
    # the controller and the snapshot-controller: non-root, no host paths at all
    for workload in util.by_kind(docs, "Deployment"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert not any("hostPath" in v for v in pod.get("volumes", [])), workload["metadata"][
            "name"
        ]
        for c in pod["containers"]:
            assert c["securityContext"].get("runAsUser", 1) != 0


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_node_sidecars(render, name: str) -> None:
    ds = node_ds(render(values_of(name)))
    cs = util.containers(ds)
    metadata = values_of(name).get("snapshotMetadata", {}).get("enabled", False)
    assert list(cs) == [
        "stowage-csi",
        "node-driver-registrar",
        "csi-provisioner",
        "csi-snapshotter",
        *(["csi-snapshot-metadata"] if metadata else []),
        "liveness-probe",
    ]
    prov = util.flags(cs["csi-provisioner"])
    for flag in ("node-deployment", "enable-capacity", "extra-create-metadata"):
        assert flag in prov and prov[flag] is None, flag
    # DaemonSet pod -> its controller (the DaemonSet) owns the CSIStorageCapacity objects
    assert prov["capacity-ownerref-level"] == "1"
    # Topology is GA and on by default at v6.3.0: no feature gate needed
    assert "feature-gates" not in prov
    e = env(cs["csi-provisioner"])
    assert e["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert e["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert e["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    snap = util.flags(cs["csi-snapshotter"])
    assert "node-deployment" in snap and snap["node-deployment"] is None
    assert (
        env(cs["csi-snapshotter"])["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "spec.nodeName"
    )
    for c in cs.values():  # csi-snapshotter exits when --node-deployment meets --leader-election
        assert "leader-election" not in util.flags(c)
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    for c in cs.values():
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_controller_and_leader_election(render, name: str) -> None:
    docs = render(values_of(name))
    dep = controller(docs)
    replicas = values_of(name).get("controller", {}).get("replicas", 1)
    assert dep["spec"]["replicas"] == replicas
    cs = util.containers(dep)
    backups = bool(values_of(name).get("backup", {}).get("targets"))
    assert list(cs) == [
        "stowage-csi", "csi-resizer", *(["csi-snapshotter"] if backups else []), "liveness-probe"
    ]
    f = util.flags(cs["stowage-csi"])
    assert f["mode"] == "controller"
    assert "pool-dir" not in f and "node-id" not in f
    assert ("leader-election" in util.flags(cs["csi-resizer"])) == (replicas > 1)
    if values_of(name).get("snapshotController", {}).get("enabled", True):
        sc = util.one(docs, "Deployment", "snapshot-controller")
        sf = util.flags(util.containers(sc)["snapshot-controller"])
        assert "enable-distributed-snapshotting" in sf
        assert sf["leader-election"] == "true"
    else:
        assert not [d for d in docs if d["metadata"]["name"].endswith("snapshot-controller")]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_liveness_probe_wired_to_driver_probe(render, name: str) -> None:
    for workload in (node_ds(render(values_of(name))), controller(render(values_of(name)))):
        cs = util.containers(workload)
        lp = util.flags(cs["liveness-probe"])
        port = int(lp["http-endpoint"].rsplit(":", 1)[1])
        drv = cs["stowage-csi"]
        ports = {p["name"]: p["containerPort"] for p in drv["ports"]}
        assert ports["healthz"] == port
        assert drv["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_metrics_wiring(render, name: str) -> None:
    docs = render(values_of(name))
    defaults = {"node": "0.0.0.0:9810", "controller": "0.0.0.0:9811"}
    sm_on = values_of(name).get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    for component, workload in (("node", node_ds(docs)), ("controller", controller(docs))):
        address = values_of(name).get(component, {}).get("metricsAddress", defaults[component])
        drv = util.containers(workload)["stowage-csi"]
        ports = {p["name"]: p["containerPort"] for p in drv["ports"]}
        services = [
            s
            for s in util.by_kind(docs, "Service")
            if s["metadata"]["name"].endswith(f"-{component}-metrics")
        ]
        monitors = [
            s
            for s in util.by_kind(docs, "ServiceMonitor")
            if s["metadata"]["name"].endswith(f"-{component}")
        ]
        if not address:
            assert "metrics-address" not in util.flags(drv)
            assert "metrics" not in ports and not services and not monitors
            continue
        assert util.flags(drv)["metrics-address"] == address
        port = int(address.rsplit(":", 1)[1])
        assert ports["metrics"] == port
        (svc,) = services
        assert svc["spec"]["ports"] == [
            {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
        ]
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component
        assert len(monitors) == (1 if sm_on else 0)
        if sm_on:
            mon = monitors[0]
            assert all(
                svc["metadata"]["labels"].get(k) == v
                for k, v in mon["spec"]["selector"]["matchLabels"].items()
            )
            assert mon["spec"]["endpoints"][0]["port"] == "metrics"
            assert mon["metadata"]["labels"]["release"] == "prom"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_flags_exist_at_pinned_versions(render, name: str) -> None:
    for workload in all_workloads(render(values_of(name))):
        for cname, c in util.containers(workload).items():
            unknown = set(util.flags(c)) - KNOWN_FLAGS[cname]
            assert not unknown, f"{cname}: unknown flags {unknown}"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_images_pinned_and_overridable(render, name: str) -> None:
    docs = render(values_of(name))
    custom = name == "custom-images"
    for workload in all_workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        for cname, c in util.containers(workload).items():
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            if cname == "stowage-csi":
                want = (
                    "mirror.example.com/stowage/stowage-csi:0.1.0-rc1"
                    if custom
                    else "stowage-csi:0.1.0"
                )
                assert image == want
            else:
                want = PINNED[cname]
                if custom:
                    repo, tag = want.rsplit(":", 1)
                    want = f"mirror.example.com/sig-storage/{repo.rsplit('/', 1)[1]}:{tag}-mirror"
                assert image == want, cname
            assert c["imagePullPolicy"] == ("Always" if custom else "IfNotPresent")
        assert pod.get("imagePullSecrets", []) == ([{"name": "mirror-creds"}] if custom else [])


def test_default_storage_classes(render) -> None:
    classes = {s["metadata"]["name"]: s for s in util.by_kind(render(), "StorageClass")}
    assert set(classes) == {"stowage", "stowage-xfs", "stowage-block"}
    for sc in classes.values():
        assert sc["provisioner"] == DRIVER
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert "storageclass.kubernetes.io/is-default-class" not in sc["metadata"].get(
            "annotations", {}
        )
    assert classes["stowage"]["parameters"] == {"csi.storage.k8s.io/fstype": "ext4"}
    assert classes["stowage"]["reclaimPolicy"] == "Delete"
    assert classes["stowage-xfs"]["parameters"] == {"csi.storage.k8s.io/fstype": "xfs"}
    assert "parameters" not in classes["stowage-block"]
    vsc = util.one(render(), "VolumeSnapshotClass")
    assert vsc["driver"] == DRIVER and vsc["deletionPolicy"] == "Delete"
    assert (
        vsc["metadata"]["annotations"]["snapshot.storage.kubernetes.io/is-default-class"] == "true"
    )
    # a hook: `helm install` maps it only once the release's snapshot CRDs exist (make e2e-node)
    assert vsc["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_of_a_crd_kind_is_a_post_install_hook(render, name: str) -> None:
    # helm maps a release's resources before creating any: an object whose kind comes from a
    # CRD of the same release (the snapshot and group snapshot classes, the backup class)
    # fails `helm install` unless it is a hook, created after the CRDs (make e2e-node).
    docs = render(values_of(name))
    crds = util.by_kind(docs, "CustomResourceDefinition")
    crd_kinds = {d["spec"]["names"]["kind"] for d in crds}
    for d in (d for d in docs if d["kind"] in crd_kinds):
        annotations = d["metadata"].get("annotations", {})
        assert annotations.get("helm.sh/hook") == "post-install,post-upgrade", (
            f"{d['kind']} {d['metadata']['name']}"
        )


def test_custom_storage_class(render) -> None:
    docs = render(VALUE_SETS["servicemonitor-and-classes"])
    (sc,) = util.by_kind(docs, "StorageClass")
    assert sc["metadata"]["name"] == "fast"
    assert sc["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert sc["parameters"] == {"csi.storage.k8s.io/fstype": "xfs", "example.com/tier": "gold"}
    assert sc["mountOptions"] == ["noatime"] and sc["reclaimPolicy"] == "Retain"
    vsc = util.one(docs, "VolumeSnapshotClass")
    assert vsc["metadata"]["name"] == "fast-snap"
    assert "snapshot.storage.kubernetes.io/is-default-class" not in vsc["metadata"]["annotations"]


def test_namespace_is_the_release_namespace(render) -> None:
    for doc in render(namespace="storage"):
        if doc["kind"] in (
            "CSIDriver",
            "StorageClass",
            "VolumeSnapshotClass",
            "VolumeGroupSnapshotClass",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
        ):
            assert "namespace" not in doc["metadata"], doc["metadata"]
        else:
            assert doc["metadata"]["namespace"] == "storage", doc["metadata"]
        for subject in doc.get("subjects", []):
            assert subject["namespace"] == "storage"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_group_snapshots_are_wired_together(render, name: str) -> None:
    """volumeGroupSnapshots.enabled turns on the CSIVolumeGroupSnapshot gate of csi-snapshotter
    and the snapshot-controller, the group CRDs and the class together, or none of them."""
    values = values_of(name)
    on = values.get("volumeGroupSnapshots", {}).get("enabled", True)
    docs = render(values)
    gated = [util.containers(node_ds(docs))["csi-snapshotter"]]
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("snapshot-controller"):
            gated.append(util.containers(d)["snapshot-controller"])
    for c in gated:
        gate = util.flags(c).get("feature-gates")
        assert gate == ("CSIVolumeGroupSnapshot=true" if on else None), (c["name"], gate)
    crds = {d["spec"]["group"] for d in util.by_kind(docs, "CustomResourceDefinition")}
    crds_on = values.get("snapshotCRDs", {}).get("install", True)
    assert ("groupsnapshot.storage.k8s.io" in crds) == (on and crds_on), crds
    classes = util.by_kind(docs, "VolumeGroupSnapshotClass")
    class_on = values.get("volumeGroupSnapshots", {}).get("class", {}).get("create", True)
    assert len(classes) == int(on and class_on)
    for cls in classes:
        assert cls["apiVersion"] == "groupsnapshot.storage.k8s.io/v1"
        assert cls["driver"] == "stowage.csi.io"


def test_snapshot_metadata_sidecar_service_and_tls_agree(render) -> None:
    """The sidecar serves TLS from the Secret the SnapshotMetadataService's caCert vouches for,
    on the port the Service targets, at the address the object advertises; validated against
    the shipped cbt.storage.k8s.io/v1beta1 CRD."""
    import base64
    import subprocess
    import tempfile

    docs = render(values_of("snapshot-metadata"))
    (sms,) = util.by_kind(docs, "SnapshotMetadataService")
    assert sms["apiVersion"] == "cbt.storage.k8s.io/v1beta1"
    assert sms["metadata"]["name"] == "stowage.csi.io"
    assert sms["spec"]["audience"] == "stowage.csi.io"
    util.crd_validate(sms)
    (svc,) = [d for d in util.by_kind(docs, "Service") if d["metadata"]["name"].endswith(
        "snapshot-metadata")]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}"
    assert sms["spec"]["address"] == f"{host}:{svc['spec']['ports'][0]['port']}"
    sidecar = util.containers(node_ds(docs))["csi-snapshot-metadata"]
    flags = util.flags(sidecar)
    port = sidecar["ports"][0]
    assert port["name"] == svc["spec"]["ports"][0]["targetPort"]
    assert flags["port"] == str(port["containerPort"])
    assert flags["csi-address"] == "/csi/csi.sock"
    (secret,) = [d for d in util.by_kind(docs, "Secret") if d["type"] == "kubernetes.io/tls"]
    vols = {v["name"]: v for v in node_ds(docs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["snapshot-metadata-tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    tls_dir = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}["snapshot-metadata-tls"]
    assert flags["tls-cert"] == f"{tls_dir}/tls.crt" and flags["tls-key"] == f"{tls_dir}/tls.key"
    assert secret["data"]["ca.crt"] == sms["spec"]["caCert"]
    with tempfile.TemporaryDirectory() as tmp:
        ca, cert = f"{tmp}/ca.pem", f"{tmp}/cert.pem"
        with open(ca, "wb") as fh:
            fh.write(base64.b64decode(sms["spec"]["caCert"]))
        with open(cert, "wb") as fh:
            fh.write(base64.b64decode(secret["data"]["tls.crt"]))
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", ca, "-verify_hostname", host, cert],
            capture_output=True, text=True, check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr

