"""Helpers shared by the chart tests (no pytest fixtures here)."""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stowage"
EXAMPLES = REPO / "deploy" / "examples"
CRD_DIR = CHART / "files" / "snapshot-crds"
K8S_VERSIONS = ("1.32", "1.33", "1.34", "1.35")
RELEASE = "stowage"

# The value sets every rendering test runs against (besides the defaults).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no-snapshot-crds": {
        "snapshotCRDs": {"install": False},
        "snapshotController": {"enabled": False},
        "volumeSnapshotClass": {"create": False},
        "volumeGroupSnapshots": {"class": {"create": False}},
    },
    "custom-pool": {
        "node": {
            "poolDir": "/mnt/nvme0/stowage-pool",
            "poolRequireMountpoint": False,
            "maxVolumesPerNode": 64,
            "reservedBytes": 10737418240,
        },
        "kubeletDir": "/var/lib/k0s/kubelet",
    },
    "controller-replicas-2": {"controller": {"replicas": 2}},
    "backup": {
        "backup": {
            "targets": [
                {"name": "main", "url": "s3://stowage-backups/prod?endpoint=https://s3.example.com"},
                {"name": "dr", "url": "s3://dr/x?endpoint=http://10.0.0.9:9000&region=eu-1"},
            ],
            "credentialsSecret": "stowage-s3",
            "keySecret": "stowage-backup-key",
            "clusterId": "prod-eu1",
            "volumeSnapshotClass": {"target": "dr", "deletionPolicy": "Retain"},
        }
    },
    "no-group-snapshots": {"volumeGroupSnapshots": {"enabled": False}},
    "snapshot-metadata": {"snapshotMetadata": {"enabled": True}},
    "metrics-off": {"node": {"metricsAddress": ""}, "controller": {"metricsAddress": ""}},
    "custom-images": {
        "image": {
            "repository": "mirror.example.com/stowage/stowage-csi",
            "tag": "0.1.0-rc1",
            "pullPolicy": "Always",
        },
        "imagePullSecrets": ["mirror-creds"],
        "sidecars": {
            name: {
                "image": {
                    "repository": f"mirror.example.com/sig-storage/{img}",
                    "tag": f"{tag}-mirror",
                    "pullPolicy": "Always",
                }
            }
            for name, img, tag in (
                ("nodeDriverRegistrar", "csi-node-driver-registrar", "v2.17.0"),
                ("provisioner", "csi-provisioner", "v6.3.0"),
                ("snapshotter", "csi-snapshotter", "v8.6.0"),
                ("resizer", "csi-resizer", "v2.2.1"),
                ("livenessProbe", "livenessprobe", "v2.19.0"),
            )
        },
        "snapshotController": {
            "image": {
                "repository": "mirror.example.com/sig-storage/snapshot-controller",
                "tag": "v8.6.0-mirror",
                "pullPolicy": "Always",
            }
        },
    },
    "servicemonitor-and-classes": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "logLevel": "debug",
        "logFormat": "text",
        "storageClasses": [
            {
                "name": "fast",
                "isDefault": True,
                "fsType": "xfs",
                "reclaimPolicy": "Retain",
                "volumeBindingMode": "WaitForFirstConsumer",
                "allowVolumeExpansion": True,
                "mountOptions": ["noatime"],
                "parameters": {"example.com/tier": "gold"},
            },
        ],
        "volumeSnapshotClass": {
            "name": "fast-snap",
            "isDefault": False,
            "deletionPolicy": "Retain",
        },
    },
}


def canonical(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


def helm_template(helm: str, values: dict[str, Any], tmp: Path, namespace: str) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=tmp, delete=False) as fh:
        yaml.safe_dump(values, fh)
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", namespace, "-f", fh.name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def helm_run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str = "") -> dict:
    """The single object of a kind (named <release>-<component> when component is given)."""
    found = [
        d
        for d in by_kind(docs, kind)
        if not component or d["metadata"]["name"] == f"{RELEASE}-{component}"
    ]
    assert len(found) == 1, (
        f"expected one {kind} {component}, got {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def containers(workload: dict) -> dict[str, dict]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


# Flags the driver accepts more than once (their values are joined with newlines).
REPEATABLE = {"backup-target"}


def flags(container: dict) -> dict[str, str | None]:
    """--name=value / --name args as a dict (value None for bare flags)."""
    out: dict[str, str | None] = {}
    for arg in container.get("args", []):
        assert arg.startswith("--"), f"{container['name']}: non-flag arg {arg!r}"
        name, sep, value = arg[2:].partition("=")
        if name in REPEATABLE and name in out:
            out[name] = f"{out[name]}\n{value}"
            continue
        assert name not in out, f"{container['name']}: flag --{name} given twice"
        out[name] = value if sep else None
    return out


# ---------------------------------------------------------------- schema validation


def k8s_validate(doc: dict, version: str) -> None:
    """kubernetes-validate in strict mode (unknown fields are errors)."""
    kubernetes_validate.validate(doc, version, strict=True)


def _strict(schema: Any) -> Any:
    """Copy of a CRD openAPIV3Schema where objects with declared properties reject unknown ones
    (what the API server's strict field validation does for custom resources)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict openAPIV3Schema of every served version of the chart's CRDs."""
    out: dict[tuple[str, str], dict] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_yaml_docs(path):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for ver in crd["spec"]["versions"]:
                if ver["served"]:
                    schema = copy.deepcopy(ver["schema"]["openAPIV3Schema"])
                    # metadata is validated by the API server itself; accept any object here
                    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                    out[(f"{group}/{ver['name']}", kind)] = _strict(schema)
    return out


# The CEL rules (x-kubernetes-validations) of the pinned CRDs that apply on create (rules that
# mention oldSelf are transition rules and only run on update). jsonschema ignores CEL, so each
# rule is translated here; a rule that is not in this table fails the test, so a CRD update
# cannot silently drop a check.
CEL_RULES = {
    "(has(self.volumeHandle) && !has(self.snapshotHandle)) || "
    "(!has(self.volumeHandle) && has(self.snapshotHandle))": lambda v: (
        ("volumeHandle" in v) != ("snapshotHandle" in v)
    ),
    "has(self.name) && has(self.__namespace__)": lambda v: "name" in v and "namespace" in v,
    "(has(self.volumeSnapshotContentName) && !has(self.persistentVolumeClaimName)) || "
    "(!has(self.volumeSnapshotContentName) && has(self.persistentVolumeClaimName))": lambda v: (
        ("volumeSnapshotContentName" in v) != ("persistentVolumeClaimName" in v)
    ),
    "size(self) > 0": lambda v: len(v) > 0,
    # groupsnapshot.storage.k8s.io (external-snapshotter v8.6.0)
    "(has(self.volumeHandles) && !has(self.groupSnapshotHandles)) || "
    "(!has(self.volumeHandles) && has(self.groupSnapshotHandles))": lambda v: (
        ("volumeHandles" in v) != ("groupSnapshotHandles" in v)
    ),
    "(has(self.selector) && !has(self.volumeGroupSnapshotContentName)) || "
    "(!has(self.selector) && has(self.volumeGroupSnapshotContentName))": lambda v: (
        ("selector" in v) != ("volumeGroupSnapshotContentName" in v)
    ),
}


def _check_cel(schema: dict, value: Any, path: str) -> None:
    for rule in schema.get("x-kubernetes-validations", []) or []:
        text = " ".join(rule["rule"].split())
        if "oldSelf" in text:
            continue
        assert text in CEL_RULES, f"untranslated CEL rule at {path}: {text}"
        if not CEL_RULES[text](value):
            raise jsonschema.ValidationError(f"{path}: {rule.get('message', text)}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check_cel(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _check_cel(schema["items"], item, f"{path}[{i}]")


def crd_validate(doc: dict) -> None:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"no CRD schema for {doc['apiVersion']} {doc['kind']}"
    jsonschema.validate(doc, schema)
    _check_cel(schema, doc, doc["kind"])
    name = doc.get("metadata", {}).get("name", "")
    assert name and len(name) <= 253, f"bad metadata.name {name!r}"


CRD_KINDS = {
    "VolumeSnapshot",
    "VolumeSnapshotClass",
    "VolumeSnapshotContent",
    "VolumeGroupSnapshot",
    "VolumeGroupSnapshotClass",
    "VolumeGroupSnapshotContent",
    "SnapshotMetadataService",
}


def validate_any(doc: dict, versions: tuple[str, ...] = K8S_VERSIONS) -> str:
    """Validate one object with the right validator; returns which one was used."""
    if doc["kind"] in CRD_KINDS:
        crd_validate(doc)
        return "crd"
    if doc["kind"] == "ServiceMonitor":
        # No schema offline for monitoring.coreos.com; check the fields the chart sets.
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        spec = doc["spec"]
        assert set(spec) == {"selector", "namespaceSelector", "endpoints"}, spec.keys()
        assert spec["selector"]["matchLabels"]
        for ep in spec["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}, ep
        return "servicemonitor"
    for v in versions:
        k8s_validate(doc, v)
    return "kubernetes"
