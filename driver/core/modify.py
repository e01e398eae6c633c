"""ModifyVolume: a volume's mutable parameters (I/O limits, from a VolumeAttributesClass), stored
with the volume and applied on its node to the loop device, in the cgroups of the pods that
publish it (driver.host.cgroups says where the I/O is charged).

How a change reaches the node (docs/design.md, "ModifyVolume"):

- On a node (modes `all` and `node`) `IoLimitsCore.modify` checks, stores (image record, then
  row) and applies at once to every publication that carries a pod UID. A volume that is not
  published keeps the limits for its next NodePublishVolume.
- Controller mode has no pool: `modify_request` checks the request and answers OK, exactly as
  `expand_request` answers ControllerExpandVolume. csi-resizer then records the new class on
  the PersistentVolume (`spec.volumeAttributesClassName`), and the node holding the volume,
  which watches its PersistentVolumes (`driver.core.kubewatch`), stores and applies the class's
  parameters through `IoLimitsCore.modify`, the same code as above.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from driver import validation
from driver.core.pool import PoolContext
from driver.errors import NotFound, StowageError
from driver.model import Volume

log = logging.getLogger(__name__)

#: How often a node re-applies limits to the cgroups of published volumes (cgroup v1 limits are
#: per cgroup, and a container started after the publish has a new one).
REAPPLY_INTERVAL = 5.0


def modify_request(volume_id: str, mutable: Mapping[str, str]) -> None:
    """ControllerModifyVolume without a pool (controller mode): only what the request itself
    shows. Unknown, immutable or malformed parameters are INVALID_ARGUMENT; a malformed ID is
    NOT_FOUND; a well-formed ID is accepted (the node that holds it applies the change)."""
    validation.present(volume_id=volume_id)
    validation.merge_mutable_parameters({}, mutable)
    validation.require_volume_id(volume_id)


class IoLimitsCore:
    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx
        self._reported: set[tuple[str, str]] = set()  # (volume, problem) logged by reapply

    def modify(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        """ControllerModifyVolume on the node that holds the volume. Everything is checked
        before anything changes: a refused request leaves record, row and cgroups as they
        were."""
        modify_request(volume_id, mutable)
        self.ctx.require_healthy()
        with self.ctx.locks.hold(volume_id):
            vol = self.ctx.store.get_volume(volume_id)
            if vol is None:
                raise NotFound(f"volume {volume_id} does not exist on node {self.ctx.node_id}")
            merged = validation.merge_mutable_parameters(vol.mutable_parameters, mutable)
            if merged != vol.mutable_parameters:
                # The record first: a rebuilt store takes the limits from it.
                self.ctx.backend.amend_record(volume_id, mutable_parameters=merged)
                self.ctx.store.set_mutable_parameters(volume_id, merged)
                log.info("volume %s: mutable parameters now %s", volume_id, merged or "none")
            self._apply_all(volume_id, merged)
            return dataclasses.replace(vol, mutable_parameters=merged)

    def apply(self, volume_id: str, mutable: Mapping[str, str], device: str, pod_uid: str) -> int:
        """Write the volume's limits for one publication (NodePublishVolume, reconciliation).
        Without a pod UID (CSIDriver without podInfoOnMount, or csi-sanity) there is no cgroup
        to write them to: logged when there are limits to apply."""
        limits = validation.io_limits(mutable)
        if not pod_uid:
            if not limits.unlimited:
                log.warning(
                    "volume %s has I/O limits but its publication has no pod UID (is "
                    "podInfoOnMount set on the CSIDriver?); they are not applied", volume_id
                )
            return 0
        return self.ctx.host.set_io_limits(pod_uid, device, limits)

    def _apply_all(self, volume_id: str, mutable: Mapping[str, str]) -> None:
        staging = self.ctx.store.staging(volume_id)
        if staging is None:
            return  # applied at the next publish
        for pub in self.ctx.store.publications(volume_id):
            written = self.apply(volume_id, mutable, staging.device, pub.pod_uid)
            if pub.pod_uid and not written:
                log.info("volume %s: pod %s has no cgroup on this node (yet); reconciliation "
                         "applies the limits when it has", volume_id, pub.pod_uid)

    def reapply(self) -> int:
        """Write the limits of every published volume that has some into its pods' cgroups
        again (a container that started after the publish, on cgroup v1; a driver restart).
        Returns the number of cgroups written; a failure is logged, never raised."""
        written = 0
        for pub in self.ctx.store.publications():
            if not pub.pod_uid:
                continue
            try:
                vol = self.ctx.store.get_volume(pub.volume_id)
                staging = self.ctx.store.staging(pub.volume_id)
                if vol is None or staging is None or not vol.mutable_parameters:
                    continue
                written += self.apply(vol.id, vol.mutable_parameters, staging.device, pub.pod_uid)
            except StowageError as exc:  # every 5 s: said once per volume and problem
                if (pub.volume_id, str(exc)) not in self._reported:
                    self._reported.add((pub.volume_id, str(exc)))
                    log.warning("could not re-apply the I/O limits of %s: %s", pub.volume_id, exc)
        return written
