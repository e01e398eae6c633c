"""Backup values (issue 16): targets, the credentials and key Secrets and the cluster ID reach
the node driver and the controller driver; the controller's node-independent csi-snapshotter
serves only the contents labelled with the controller identity; the backup class names its
target; missing Secrets or cluster ID are refused at render time."""

from __future__ import annotations

import pytest

from . import util
from .util import VALUE_SETS

BACKUP = VALUE_SETS["backup"]
KEY_DIR = "/etc/stowage/backup-key"


def workload(docs: list[dict], kind: str, component: str) -> dict:
    return util.one(docs, kind, component)


def test_no_targets_renders_nothing_of_backups(render) -> None:
    docs = render()
    for kind, component in (("DaemonSet", "node"), ("Deployment", "controller")):
        w = workload(docs, kind, component)
        cs = util.containers(w)
        assert not any(a.startswith("--backup") for a in cs["stowage-csi"]["args"])
        assert not any(e["name"].startswith("AWS_") for e in cs["stowage-csi"].get("env", []))
        assert "backup-key" not in {v["name"] for v in w["spec"]["template"]["spec"]["volumes"]}
    assert "csi-snapshotter" not in util.containers(workload(docs, "Deployment", "controller"))
    assert [c["metadata"]["name"] for c in util.by_kind(docs, "VolumeSnapshotClass")] == [
        "stowage"
    ]


@pytest.mark.parametrize(
    ("kind", "component"), [("DaemonSet", "node"), ("Deployment", "controller")]
)
def test_targets_key_credentials_and_cluster_reach_both_drivers(render, kind, component) -> None:
    w = workload(render(BACKUP), kind, component)
    driver = util.containers(w)["stowage-csi"]
    f = util.flags(driver)
    want = [f"{t['name']}={t['url']}" for t in BACKUP["backup"]["targets"]]
    assert f["backup-target"] == "\n".join(want)
    assert f["backup-key-file"] == f"{KEY_DIR}/backup.key"
    assert f["backup-cluster-id"] == "prod-eu1"
    env = {e["name"]: e for e in driver["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "stowage-s3", "key": name}
        assert "value" not in env[name]  # never the secret itself in the pod spec
    mount = next(m for m in driver["volumeMounts"] if m["name"] == "backup-key")
    assert mount == {"name": "backup-key", "mountPath": KEY_DIR, "readOnly": True}
    vol = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "backup-key")
    assert vol["secret"]["secretName"] == "stowage-backup-key"
    assert vol["secret"]["items"] == [{"key": "backup.key", "path": "backup.key"}]
    # readable by the controller pod's non-root fsGroup, by nobody else
    assert vol["secret"]["defaultMode"] == 0o440


def test_controller_snapshotter_serves_only_the_controller_identity(render) -> None:
    docs = render(BACKUP)
    snap = util.containers(workload(docs, "Deployment", "controller"))["csi-snapshotter"]
    f = util.flags(snap)
    assert "node-deployment" in f  # the managed-by label filter
    assert "leader-election" not in f  # --node-deployment forbids it
    assert f["csi-address"] == "/csi/csi.sock"
    env = {e["name"]: e for e in snap["env"]}
    assert env["NODE_NAME"] == {"name": "NODE_NAME", "value": f"{util.RELEASE}-controller"}
    custom = {"backup": {**BACKUP["backup"], "controllerIdentity": "dr-handler"}}
    snap = util.containers(workload(render(custom), "Deployment", "controller"))["csi-snapshotter"]
    assert {e["name"]: e.get("value") for e in snap["env"]}["NODE_NAME"] == "dr-handler"
    # no node is ever named like that: the node DaemonSet's snapshotter takes spec.nodeName
    node = util.containers(workload(docs, "DaemonSet", "node"))["csi-snapshotter"]
    ref = {e["name"]: e for e in node["env"]}["NODE_NAME"]["valueFrom"]["fieldRef"]
    assert ref["fieldPath"] == "spec.nodeName"


def classes_of(docs: list[dict]) -> dict[str, dict]:
    return {c["metadata"]["name"]: c for c in util.by_kind(docs, "VolumeSnapshotClass")}


def test_backup_snapshot_class_names_its_target(render) -> None:
    classes = classes_of(render(BACKUP))
    assert set(classes) == {"stowage", "stowage-backup"}
    b = classes["stowage-backup"]
    assert b["parameters"] == {"stowage.csi.io/backup-target": "dr"}
    assert b["deletionPolicy"] == "Retain"
    assert b["driver"] == "stowage.csi.io"
    first = {"backup": {k: v for k, v in BACKUP["backup"].items() if k != "volumeSnapshotClass"}}
    classes = classes_of(render(first))
    assert classes["stowage-backup"]["parameters"]["stowage.csi.io/backup-target"] == "main"
    assert classes["stowage-backup"]["deletionPolicy"] == "Delete"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("credentialsSecret", "backup.targets needs backup.credentialsSecret"),
        ("keySecret", "backup.targets needs backup.keySecret"),
        ("clusterId", "backup.targets needs backup.clusterId"),
    ],
)
def test_targets_without_secrets_or_cluster_are_refused(helm, tmp_path, missing, message) -> None:
    values = {"backup": {k: v for k, v in BACKUP["backup"].items() if k != missing}}
    path = tmp_path / "values.yaml"
    path.write_text(util.canonical(values))
    proc = util.helm_run(helm, "template", "x", str(util.CHART), "-f", str(path))
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize(
    "target",
    [
        {"name": "Main", "url": "s3://b/p?endpoint=http://h:1"},  # not a DNS label
        {"name": "main", "url": "https://h/b"},  # not s3://
        {"name": "main", "url": "s3://b/p"},  # no endpoint
    ],
)
def test_schema_rejects_bad_targets(helm, tmp_path, target) -> None:
    values = {"backup": {**BACKUP["backup"], "targets": [target]}}
    path = tmp_path / "values.yaml"
    path.write_text(util.canonical(values))
    proc = util.helm_run(helm, "template", "x", str(util.CHART), "-f", str(path))
    assert proc.returncode != 0
    assert "backup" in proc.stderr
