"""Controller mode: answer the cluster-wide Controller RPCs without touching any pool.

The home node of each volume is learned from the catalog (the PersistentVolume objects in a
cluster); publishing to any other node is refused because a node-local volume exists only there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from driver import validation
from driver.errors import FailedPrecondition, InvalidArgument, NotFound
from driver.model import AccessType, Capability, CapacityRange


@dataclass(frozen=True)
class VolumeRef:
    volume_id: str
    node_id: str
    size: int
    access_type: AccessType
    fs_type: str


class Catalog(Protocol):
    def lookup(self, volume_id: str) -> VolumeRef | None: ...


class GateCore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def volume(self, volume_id: str) -> VolumeRef:
        validation.require_volume_id(volume_id)
        ref = self.catalog.lookup(volume_id)
        if ref is None:
            raise NotFound(f"volume {volume_id} is not known to the cluster")
        return ref

    def publish(
        self, volume_id: str, node_id: str, cap: Capability, readonly: bool
    ) -> dict[str, str]:
        validation.check_string("node_id", node_id)
        validation.check_capability(cap)
        ref = self.volume(volume_id)
        if node_id != ref.node_id:
            raise FailedPrecondition(
                f"volume {volume_id} lives on node {ref.node_id}; "
                f"it cannot be attached to {node_id}"
            )
        if cap.access_type is not ref.access_type:
            raise InvalidArgument(
                f"volume {volume_id} is a {ref.access_type.value} volume, requested as "
                f"{cap.access_type.value}"
            )
        return validation.publish_context(ref.access_type, ref.fs_type, readonly)

    def validate(self, volume_id: str, caps: Sequence[Capability]) -> str:
        ref = self.volume(volume_id)
        return validation.unsupported_capability(
            volume_id, caps, ref.access_type, ref.fs_type, formatted=bool(ref.fs_type)
        )

    def expand(self, volume_id: str, rng: CapacityRange) -> int:
        """Gate only: the node grows the image, the loop device and the filesystem."""
        ref = self.volume(volume_id)
        return validation.resolve_size(rng, ref.access_type, ref.fs_type or "ext4", ref.size)
