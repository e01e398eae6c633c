"""The node's half of ModifyVolume in a cluster (docs/design.md, "ModifyVolume").

csi-resizer sends ControllerModifyVolume to the controller pod, which has no pool and answers
from the request (`driver.core.modify.modify_request`). When it answers OK, csi-resizer records
the new class on the PersistentVolume (`spec.volumeAttributesClassName`). Every node plugin
watches PersistentVolumes (one watch per node, no per-call reads) and, for a Stowage volume in
its own pool whose class is set, reads that VolumeAttributesClass (immutable in Kubernetes, so
read once per name) and applies its parameters through `IoLimitsCore.modify`, the code a
ControllerModifyVolume on the node runs. It stores them with the volume, so they survive a
driver restart and a reboot, and writes them into the cgroups of the pods that publish it;
applying the same parameters again changes nothing. A node that was down catches up at its
next start (the first list).

Only the keys a class names are applied (the CSI spec: a plugin must not modify a volume based
on the absence of keys); a class lifts a limit with the value `unlimited`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from driver import DRIVER_NAME, ids
from driver.core.modify import IoLimitsCore
from driver.errors import Aborted, StowageError

log = logging.getLogger(__name__)

#: After a failed list or watch, wait this long before listing again.
RETRY_SECONDS = 5.0
#: A volume busy with another call (ABORTED) is tried this many times, RETRY_SECONDS / 5 apart.
BUSY_ATTEMPTS = 5
#: A watch ends after this long and is started again from a fresh list (a resync).
WATCH_SECONDS = 300


class ClusterView(Protocol):
    """What the watch reads from the Kubernetes API, as plain JSON objects."""

    def list_volumes(self) -> tuple[list[dict[str, Any]], str]:
        """Every PersistentVolume, and the list's resourceVersion."""
        ...

    def watch_volumes(self, resource_version: str, seconds: int) -> Iterator[dict[str, Any]]:
        """PersistentVolumes as they are added or modified after `resource_version`."""
        ...

    def class_parameters(self, name: str) -> dict[str, str] | None:
        """The parameters of VolumeAttributesClass `name`; None when there is none."""
        ...


class AttributesWatch:
    def __init__(
        self, limits: IoLimitsCore, view: ClusterView, retry: float = RETRY_SECONDS
    ) -> None:
        self.limits = limits
        self.view = view
        self.retry = retry
        self._classes: dict[str, dict[str, str]] = {}

    def handle(self, pv: Mapping[str, Any]) -> bool:
        """Apply the class of one PersistentVolume if it is a Stowage volume of this pool.
        True when parameters were applied (or found already applied)."""
        spec = pv.get("spec") or {}
        source = spec.get("csi") or {}
        volume_id = str(source.get("volumeHandle") or "")
        name = str(spec.get("volumeAttributesClassName") or "")
        if source.get("driver") != DRIVER_NAME or not name or not ids.is_volume_id(volume_id):
            return False
        if self.limits.ctx.store.get_volume(volume_id) is None:
            return False  # another node's volume
        params = self._classes.get(name)
        if params is None:
            params = self.view.class_parameters(name)
            if params is None:
                log.warning("volume %s names VolumeAttributesClass %s, which does not exist",
                            volume_id, name)
                return False
            self._classes[name] = params
        for attempt in range(BUSY_ATTEMPTS):
            try:
                self.limits.modify(volume_id, params)
                return True
            except Aborted:  # another call holds the volume (a publish): soon done
                if attempt + 1 < BUSY_ATTEMPTS:
                    time.sleep(self.retry / 5)
            except StowageError as exc:  # the next event or resync retries
                log.warning("volume %s: could not apply VolumeAttributesClass %s: %s",
                            volume_id, name, exc)
                return False
        log.warning("volume %s: busy; VolumeAttributesClass %s is applied at the next resync",
                    volume_id, name)
        return False

    def sync(self) -> str:
        """Apply every PersistentVolume's class; the resourceVersion to watch from."""
        volumes, version = self.view.list_volumes()
        for pv in volumes:
            self.handle(pv)
        return version

    def run(self, stopping: threading.Event) -> None:
        """List, then watch, until `stopping` is set; any failure lists again after a pause."""
        while not stopping.is_set():
            try:
                version = self.sync()
                for pv in self.view.watch_volumes(version, WATCH_SECONDS):
                    if stopping.is_set():
                        return
                    self.handle(pv)
            except Exception as exc:  # noqa: BLE001 - API trouble must not stop the node plugin
                log.warning("watching PersistentVolumes failed (%s); listing again in %.0f s",
                            exc, self.retry)
                stopping.wait(self.retry)


class KubeClusterView:
    """ClusterView through the Kubernetes Python client: in-cluster credentials (the node
    DaemonSet's ServiceAccount) or a kubeconfig file. Objects are read as raw JSON, so fields
    the client's models do not know yet are kept."""

    def __init__(self, kubeconfig: str = "") -> None:
        import json

        import kubernetes  # slow to import: only when enabled

        # The client's typing is partial; it is used through Any, on raw JSON.
        k8s: Any = kubernetes
        if kubeconfig:
            k8s.config.load_kube_config(config_file=kubeconfig)
        else:
            k8s.config.load_incluster_config()
        self._json = json
        self._core: Any = k8s.client.CoreV1Api()
        self._custom: Any = k8s.client.CustomObjectsApi()
        self._watch: Any = k8s.watch
        self._api_error: type[Exception] = k8s.client.exceptions.ApiException

    def list_volumes(self) -> tuple[list[dict[str, Any]], str]:
        resp = self._core.list_persistent_volume(_preload_content=False)
        body = self._json.loads(resp.data)
        return list(body.get("items") or []), str(body["metadata"].get("resourceVersion", ""))

    def watch_volumes(self, resource_version: str, seconds: int) -> Iterator[dict[str, Any]]:
        w = self._watch.Watch()
        for event in w.stream(
            self._core.list_persistent_volume,
            resource_version=resource_version,
            timeout_seconds=seconds,
            allow_watch_bookmarks=False,
        ):
            if event.get("type") in ("ADDED", "MODIFIED"):
                yield dict(event["raw_object"])

    def class_parameters(self, name: str) -> dict[str, str] | None:
        try:
            obj: dict[str, Any] = self._custom.get_cluster_custom_object(
                "storage.k8s.io", "v1", "volumeattributesclasses", name
            )
        except self._api_error as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise
        if obj.get("driverName") != DRIVER_NAME:
            log.warning("VolumeAttributesClass %s is for driver %s, not %s", name,
                        obj.get("driverName"), DRIVER_NAME)
            return None
        return {str(k): str(v) for k, v in (obj.get("parameters") or {}).items()}
