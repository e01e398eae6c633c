"""Read-only view of the cluster for controller mode: PersistentVolumes by CSI volume handle."""

from __future__ import annotations

import logging
from typing import Any

from driver import DRIVER_NAME, TOPOLOGY_KEY
from driver.core.gate import VolumeRef
from driver.errors import Unavailable
from driver.model import AccessType

log = logging.getLogger(__name__)

_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_quantity(q: str) -> int:
    for suffix, mult in _UNITS.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * mult)
    return int(float(q))


class KubeCatalog:
    """Looks up PersistentVolumes through the in-cluster (or kubeconfig) API client."""

    def __init__(self, api: Any = None) -> None:
        self._api = api

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def lookup(self, volume_id: str) -> VolumeRef | None:
        try:
            pvs = self._client().list_persistent_volume().items
        except Exception as exc:  # noqa: BLE001 - any API failure means "cannot answer now"
            raise Unavailable(f"cannot list PersistentVolumes: {exc}") from exc
        for pv in pvs:
            csi = pv.spec.csi
            if csi is None or csi.driver != DRIVER_NAME or csi.volume_handle != volume_id:
                continue
            attrs = csi.volume_attributes or {}
            node = attrs.get("stowage.csi.io/node", "")
            if not node and pv.spec.node_affinity and pv.spec.node_affinity.required:
                for term in pv.spec.node_affinity.required.node_selector_terms or []:
                    for expr in term.match_expressions or []:
                        if expr.key == TOPOLOGY_KEY and expr.values:
                            node = expr.values[0]
            access = AccessType.BLOCK if pv.spec.volume_mode == "Block" else AccessType.MOUNT
            return VolumeRef(
                volume_id=volume_id,
                node_id=node,
                size=parse_quantity(str((pv.spec.capacity or {}).get("storage", "0"))),
                access_type=access,
                fs_type=attrs.get("stowage.csi.io/fs-type", csi.fs_type or ""),
            )
        return None
