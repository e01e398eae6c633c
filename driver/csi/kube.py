"""Read-only view of the cluster for controller mode: PersistentVolumes by CSI volume handle."""

from __future__ import annotations

import logging
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from driver import DRIVER_NAME, TOPOLOGY_KEY
from driver.core.gate import VolumeRef
from driver.errors import Internal, Unavailable
from driver.model import AccessType

log = logging.getLogger(__name__)

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def parse_quantity(q: str) -> int:
    """A Kubernetes resource quantity in bytes, rounded up ("1Gi", "1500k", "2e9", "1.5Gi")."""
    text = q.strip()
    try:
        for suffix, power in _BINARY.items():
            if text.endswith(suffix):
                return _ceil(Decimal(text[: -len(suffix)]) * 1024**power)
        for suffix, power in _DECIMAL.items():
            if text.endswith(suffix):
                return _ceil(Decimal(text[: -len(suffix)]) * 1000**power)
        return _ceil(Decimal(text))
    except InvalidOperation as exc:
        raise Internal(f"cannot parse quantity {q!r}") from exc


class KubeCatalog:
    """Looks up PersistentVolumes through the in-cluster (or kubeconfig) API client."""

    def __init__(self, api: Any = None) -> None:
        self._api = api

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api = client.CoreV1Api()
        return self._api

    def lookup(self, volume_id: str) -> VolumeRef | None:
        try:
            pvs = self._client().list_persistent_volume().items
        except Exception as exc:
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
