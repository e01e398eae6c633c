"""Controller mode: GateCore over a fake catalog, KubeCatalog over a fake API object."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import pytest

from driver import DRIVER_NAME, TOPOLOGY_KEY
from driver.core.gate import GateCore, VolumeRef
from driver.csi.kube import KubeCatalog, parse_quantity
from driver.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unavailable
from driver.model import AccessMode, AccessType, Capability, CapacityRange, GiB, MiB

VID = "v-" + "a" * 32
RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
BLOCK = Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER)


class FakeCatalog:
    def __init__(self, *refs: VolumeRef) -> None:
        self.refs = {r.volume_id: r for r in refs}
        self.lookups: list[str] = []

    def lookup(self, volume_id: str) -> VolumeRef | None:
        self.lookups.append(volume_id)
        return self.refs.get(volume_id)


@pytest.fixture
def catalog() -> FakeCatalog:
    return FakeCatalog(VolumeRef(VID, "node-a", 10 * MiB, AccessType.MOUNT, "xfs"))


@pytest.fixture
def gate(catalog: FakeCatalog) -> GateCore:
    return GateCore(catalog)


def test_gate_volume_lookup(gate: GateCore, catalog: FakeCatalog) -> None:
    assert gate.volume(VID).node_id == "node-a"
    with pytest.raises(InvalidArgument):
        gate.volume("")
    with pytest.raises(NotFound):
        gate.volume("v-" + "b" * 32)
    for bad in ("../../etc", "/etc", "s-" + "a" * 32):
        with pytest.raises(NotFound):
            gate.volume(bad)
    assert catalog.lookups == [VID, "v-" + "b" * 32]  # malformed IDs never reach the catalog


def test_gate_publish(gate: GateCore) -> None:
    assert gate.publish(VID, "node-a", RW, True) == {
        "stowage.csi.io/access-type": "mount",
        "stowage.csi.io/fs-type": "xfs",
        "stowage.csi.io/readonly": "true",
    }
    with pytest.raises(FailedPrecondition):
        gate.publish(VID, "node-b", RW, False)
    with pytest.raises(InvalidArgument):
        gate.publish(VID, "node-a", BLOCK, False)
    with pytest.raises(InvalidArgument):
        gate.publish(VID, "", RW, False)
    with pytest.raises(InvalidArgument):
        gate.publish(
            VID, "node-a", Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER), False
        )
    with pytest.raises(NotFound):
        gate.publish("v-" + "b" * 32, "node-a", RW, False)


def test_gate_validate(gate: GateCore) -> None:
    assert gate.validate(VID, [RW]) == ""
    assert "mount volume" in gate.validate(VID, [BLOCK])
    assert gate.validate(VID, [Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_READER_ONLY)])


def test_gate_expand(gate: GateCore) -> None:
    assert gate.expand(VID, CapacityRange(20 * MiB)) == 300 * MiB  # xfs minimum
    assert gate.expand(VID, CapacityRange(400 * MiB)) == 400 * MiB
    with pytest.raises(OutOfRange):
        gate.expand(VID, CapacityRange(0, 5 * MiB))


# --- KubeCatalog ---------------------------------------------------------------------------------
def pv(
    handle: str,
    *,
    driver: str = DRIVER_NAME,
    attrs: dict[str, str] | None = None,
    mode: str = "Filesystem",
    storage: str = "10Gi",
    fs_type: str = "",
    affinity_node: str | None = None,
) -> Any:
    affinity = None
    if affinity_node is not None:
        affinity = NS(
            required=NS(
                node_selector_terms=[
                    NS(match_expressions=[NS(key="other", values=["x"])]),
                    NS(match_expressions=[NS(key=TOPOLOGY_KEY, values=[affinity_node])]),
                ]
            )
        )
    return NS(
        spec=NS(
            csi=NS(driver=driver, volume_handle=handle, volume_attributes=attrs, fs_type=fs_type),
            node_affinity=affinity,
            volume_mode=mode,
            capacity={"storage": storage},
        )
    )


class FakeApi:
    def __init__(self, *pvs: Any, error: Exception | None = None) -> None:
        self.pvs = list(pvs)
        self.error = error

    def list_persistent_volume(self) -> Any:
        if self.error:
            raise self.error
        return NS(items=self.pvs)


def test_catalog_finds_volume_by_handle() -> None:
    api = FakeApi(
        NS(spec=NS(csi=None, node_affinity=None, volume_mode=None, capacity=None)),  # hostPath PV
        pv(VID, driver="other.csi.io", attrs={"stowage.csi.io/node": "wrong"}),
        pv("v-" + "c" * 32, attrs={"stowage.csi.io/node": "wrong"}),
        pv(
            VID,
            attrs={"stowage.csi.io/node": "node-a", "stowage.csi.io/fs-type": "xfs"},
            storage="300Mi",
        ),
    )
    assert KubeCatalog(api).lookup(VID) == VolumeRef(
        VID, "node-a", 300 * MiB, AccessType.MOUNT, "xfs"
    )


def test_catalog_node_from_affinity_block_mode_and_fs_fallback() -> None:
    api = FakeApi(
        pv(VID, attrs=None, mode="Block", storage="2Gi", fs_type="ext4", affinity_node="node-b")
    )
    assert KubeCatalog(api).lookup(VID) == VolumeRef(
        VID, "node-b", 2 * GiB, AccessType.BLOCK, "ext4"
    )


def test_catalog_unknown_volume_is_none() -> None:
    assert KubeCatalog(FakeApi(pv("v-" + "c" * 32))).lookup(VID) is None
    assert KubeCatalog(FakeApi()).lookup(VID) is None


def test_catalog_api_failure_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        KubeCatalog(FakeApi(error=RuntimeError("connection refused"))).lookup(VID)


def test_gate_over_kube_catalog() -> None:
    gate = GateCore(KubeCatalog(FakeApi(pv(VID, attrs={"stowage.csi.io/node": "node-a"}))))
    with pytest.raises(FailedPrecondition):
        gate.publish(VID, "node-b", RW, False)
    assert gate.publish(VID, "node-a", RW, False)["stowage.csi.io/readonly"] == "false"


@pytest.mark.parametrize(
    ("q", "n"),
    [
        ("0", 0),
        ("1024", 1024),
        ("10Gi", 10 * GiB),
        ("300Mi", 300 * MiB),
        ("4Ki", 4096),
        ("2Ti", 2 << 40),
        ("1G", 10**9),
        ("5M", 5 * 10**6),
        ("3T", 3 * 10**12),
        ("1.5Gi", 3 * GiB // 2),
        ("1e3", 1000),
    ],
)
def test_parse_quantity(q: str, n: int) -> None:
    assert parse_quantity(q) == n


@pytest.mark.parametrize(
    ("q", "n"),
    # Kubernetes' decimal kilo is a lower-case "k", and P/E (Pi/Ei) are valid suffixes; the
    # API server canonicalises capacities into these forms.
    [("1k", 1000), ("1500k", 1_500_000), ("1Pi", 1 << 50), ("2P", 2 * 10**15), ("1Ei", 1 << 60)],
)
def test_parse_quantity_kubernetes_suffixes(q: str, n: int) -> None:
    assert parse_quantity(q) == n
