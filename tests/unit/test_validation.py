"""driver.validation (names, capabilities, mount flags, parameters, IDs) and driver.core.sizing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from driver import validation
from driver.core import sizing
from driver.core.sizing import DEFAULT_VOLUME_SIZE, MIN_BLOCK_SIZE, SIZE_ALIGNMENT
from driver.errors import InvalidArgument, NotFound, OutOfRange
from driver.host.fs import FILESYSTEMS
from driver.model import (
    AccessMode,
    AccessType,
    Capability,
    CapacityRange,
    FsType,
    MiB,
)

MOUNT_RW = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
BLOCK_RW = Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER)

sizes = st.one_of(
    st.integers(min_value=0, max_value=4 << 30),
    st.integers(min_value=0, max_value=4096).map(lambda n: n * MiB),
    st.integers(min_value=0, max_value=4096).map(lambda n: n * MiB + 4096),
    st.just(0),
)
kinds = st.sampled_from([None, *FsType])  # None: a block volume


def _align(v: int, a: int) -> int:
    return -(-v // a) * a


# --- resolve_size ------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(required=sizes, limit=sizes, fs=kinds, floor=st.one_of(st.just(0), sizes))
@example(required=0, limit=MiB + 1, fs=None, floor=0)
@example(required=MiB + 1, limit=MiB + 8192, fs=None, floor=0)
def test_resolve_size_properties(required: int, limit: int, fs: FsType | None, floor: int) -> None:
    rng = CapacityRange(required, limit)
    minimum = FILESYSTEMS[fs].min_size if fs is not None else MIN_BLOCK_SIZE
    need = max(required, minimum, floor)
    if limit and required > limit:
        with pytest.raises(InvalidArgument):
            sizing.resolve_size(rng, fs, floor)
        return
    # Possible exactly when some 4 KiB-aligned size lies in [need, limit].
    possible = not limit or _align(need, 4096) <= limit
    if not possible:
        with pytest.raises(OutOfRange):
            sizing.resolve_size(rng, fs, floor)
        return
    size = sizing.resolve_size(rng, fs, floor)
    assert size % 4096 == 0
    assert size >= required and size >= minimum and size >= floor
    if limit:
        assert size <= limit
    if not limit or limit % SIZE_ALIGNMENT == 0:
        assert size % SIZE_ALIGNMENT == 0  # full alignment whenever the limit allows it
    if not limit:
        assert size == _align(max(required or DEFAULT_VOLUME_SIZE, minimum, floor), SIZE_ALIGNMENT)


def test_resolve_size_limit_only_below_default_and_not_page_aligned() -> None:
    """limit_bytes=500M (decimal) with no required_bytes: any 4 KiB multiple between 1 MiB and
    500,000,000 would do, yet the target is taken from the unaligned limit itself."""
    size = sizing.resolve_size(CapacityRange(0, 500_000_000), FsType.EXT4)
    assert MiB <= size <= 500_000_000 and size % 4096 == 0


@given(required=st.integers(max_value=-1), limit=st.integers(min_value=-5, max_value=5))
def test_resolve_size_negative_is_invalid(required: int, limit: int) -> None:
    with pytest.raises(InvalidArgument):
        sizing.resolve_size(CapacityRange(required, limit), FsType.EXT4)
    with pytest.raises(InvalidArgument):
        sizing.resolve_size(CapacityRange(0, -1), None)


@pytest.mark.parametrize(
    ("rng", "fs", "floor", "expected"),
    [
        (CapacityRange(), FsType.EXT4, 0, DEFAULT_VOLUME_SIZE),
        (CapacityRange(1), FsType.EXT4, 0, 1 * MiB),
        (CapacityRange(1), FsType.XFS, 0, 300 * MiB),
        (CapacityRange(1), FsType.BTRFS, 0, 128 * MiB),
        (CapacityRange(1), None, 0, 1 * MiB),
        (CapacityRange(0, 10 * MiB), FsType.EXT4, 0, 10 * MiB),
        (CapacityRange(5 * MiB + 1), None, 0, 6 * MiB),
        (CapacityRange(1 * MiB), FsType.EXT4, 10 * MiB, 10 * MiB),
        # limit below the next MiB: falls back to 4 KiB alignment
        (CapacityRange(MiB + 1, MiB + 8192), None, 0, MiB + 4096),
    ],
)
def test_resolve_size_examples(
    rng: CapacityRange, fs: FsType | None, floor: int, expected: int
) -> None:
    assert sizing.resolve_size(rng, fs, floor) == expected


@pytest.mark.parametrize(
    ("rng", "fs", "floor"),
    [
        (CapacityRange(0, 100 * MiB), FsType.XFS, 0),  # below xfs minimum
        (CapacityRange(0, 5 * MiB), FsType.EXT4, 10 * MiB),  # below the source's size
        (CapacityRange(MiB + 1, MiB + 1), FsType.EXT4, 0),  # no 4 KiB multiple fits
    ],
)
def test_resolve_size_out_of_range(rng: CapacityRange, fs: FsType, floor: int) -> None:
    with pytest.raises(OutOfRange):
        sizing.resolve_size(rng, fs, floor)


def test_resolve_size_required_above_limit_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        sizing.resolve_size(CapacityRange(2 * MiB, MiB), FsType.EXT4)


# --- strings -----------------------------------------------------------------------------------
def test_name_byte_limit_counts_utf8_bytes() -> None:
    validation.check_string("name", "a" * 128)
    with pytest.raises(InvalidArgument):
        validation.check_string("name", "a" * 129)
    validation.check_string("name", "é" * 64)  # 128 bytes
    with pytest.raises(InvalidArgument):
        validation.check_string("name", "é" * 65)  # 65 chars, 130 bytes


@pytest.mark.parametrize("bad", ["a\nb", "\x00", "tab\there", "del\x7f", "x\x85"])
def test_name_control_characters_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validation.check_string("name", bad)


def test_empty_string_required_or_optional() -> None:
    with pytest.raises(InvalidArgument):
        validation.check_string("name", "")
    validation.check_string("name", "", required=False)


@given(st.text(min_size=1, max_size=200))
def test_check_string_accepts_exactly_short_printable(value: str) -> None:
    import unicodedata

    ok = len(value.encode()) <= 128 and not any(unicodedata.category(c) == "Cc" for c in value)
    if ok:
        validation.check_string("name", value)
    else:
        with pytest.raises(InvalidArgument):
            validation.check_string("name", value)


def test_check_map_size_limit() -> None:
    validation.check_map("parameters", {"k": "v" * 4095})
    with pytest.raises(InvalidArgument):
        validation.check_map("parameters", {"k": "v" * 4096})


# --- mount flags -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [
        ["suid"],
        ["dev"],
        ["exec"],
        ["bind"],
        ["rbind"],
        ["remount"],
        ["move"],
        ["rw,suid"],
        ["noatime", "dev"],
        ["noatime,remount"],
        ["noatime suid"],
        ["user"],
        ["loop=/dev/sda"],
        ["context=../../etc"],
        ["commit=abc"],
        ["data=ordered,suid"],
        ["x-mount.mkdir"],
    ],
)
def test_mount_flags_rejected(flags: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        validation.check_mount_flags(flags)


@pytest.mark.parametrize(
    ("flags", "parts"),
    [
        (["noatime"], ["noatime"]),
        (["noatime,nodiratime", " discard "], ["noatime", "nodiratime", "discard"]),
        (["ro", "rw", "noexec"], ["ro", "rw", "noexec"]),
        (["commit=60"], ["commit=60"]),
        (
            ['context="system_u:object_r:container_file_t:s0"'],
            ['context="system_u:object_r:container_file_t:s0"'],
        ),
        (
            ["context=system_u:object_r:container_file_t:s0:c5"],
            ["context=system_u:object_r:container_file_t:s0:c5"],
        ),
        ([], []),
    ],
)
def test_mount_flags_accepted(flags: list[str], parts: list[str]) -> None:
    assert validation.check_mount_flags(flags) == parts


def test_mount_flags_selinux_context_with_two_categories_accepted() -> None:
    """The context pattern allows `s0:c1,c2` (what container runtimes assign), but the flag is
    split on commas before the pattern is applied, so the second category is seen as a flag."""
    flag = 'context="system_u:object_r:container_file_t:s0:c123,c456"'
    validation.check_mount_flags([flag])


# --- capabilities --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode",
    [
        AccessMode.MULTI_NODE_READER_ONLY,
        AccessMode.MULTI_NODE_SINGLE_WRITER,
        AccessMode.MULTI_NODE_MULTI_WRITER,
        AccessMode.UNKNOWN,
    ],
)
@pytest.mark.parametrize("access", [AccessType.MOUNT, AccessType.BLOCK])
def test_capability_multi_node_and_unknown_rejected(mode: AccessMode, access: AccessType) -> None:
    with pytest.raises(InvalidArgument):
        validation.check_capability(Capability(access, mode))


@pytest.mark.parametrize(
    "mode",
    [
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    ],
)
def test_capability_single_node_accepted(mode: AccessMode) -> None:
    validation.check_capability(Capability(AccessType.MOUNT, mode, "xfs", ("noatime",), "1000"))
    validation.check_capability(Capability(AccessType.BLOCK, mode))


@pytest.mark.parametrize(
    "cap",
    [
        Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER, fs_type="ext4"),
        Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_WRITER, mount_flags=("noatime",)),
        Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, fs_type="ntfs"),
        Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, mount_flags=("suid",)),
        Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, mount_group="wheel"),
        Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, mount_group="-1"),
    ],
)
def test_capability_rejected(cap: Capability) -> None:
    with pytest.raises(InvalidArgument):
        validation.check_capability(cap)


def test_check_capabilities_empty_rejected() -> None:
    with pytest.raises(InvalidArgument):
        validation.check_capabilities([])
    assert validation.check_capabilities(iter([MOUNT_RW])) == [MOUNT_RW]


# --- fs_type_for -------------------------------------------------------------------------------
def test_fs_type_for() -> None:
    assert validation.fs_type_for([MOUNT_RW], {}) == (AccessType.MOUNT, FsType.EXT4)
    assert validation.fs_type_for([MOUNT_RW], {"fsType": "xfs"}) == (AccessType.MOUNT, "xfs")
    assert validation.fs_type_for([MOUNT_RW], {"csi.storage.k8s.io/fstype": "btrfs"}) == (
        AccessType.MOUNT,
        "btrfs",
    )
    xfs = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "xfs")
    assert validation.fs_type_for([xfs, MOUNT_RW], {"fsType": "xfs"}) == (AccessType.MOUNT, "xfs")
    assert validation.fs_type_for([BLOCK_RW], {"fsType": "xfs"}) == (AccessType.BLOCK, None)


@pytest.mark.parametrize(
    ("caps", "params"),
    [
        ([MOUNT_RW, BLOCK_RW], {}),
        (
            [
                Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "xfs"),
                Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "ext4"),
            ],
            {},
        ),
        ([Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "ext4")], {"fsType": "xfs"}),
        ([MOUNT_RW], {"fsType": "zfs"}),
    ],
)
def test_fs_type_for_conflicts(caps: list[Capability], params: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        validation.fs_type_for(caps, params)


# --- parameters --------------------------------------------------------------------------------
def test_check_parameters() -> None:
    validation.check_parameters({})
    validation.check_parameters(
        {"fsType": "xfs", "preallocate": "true", "csi.storage.k8s.io/pvc/name": "p"}
    )
    for bad in (
        {"fstype": "xfs"},
        {"replicas": "3"},
        {"preallocate": "yes"},
        {"preallocate": "True"},
    ):
        with pytest.raises(InvalidArgument):
            validation.check_parameters(bad)


def test_unknown_parameter_named_in_message() -> None:
    with pytest.raises(InvalidArgument, match="'replicas'"):
        validation.check_parameters({"replicas": "3", "fsType": "ext4"})


# --- IDs and paths -----------------------------------------------------------------------------
def test_require_volume_id() -> None:
    good = "v-" + "0" * 32
    assert validation.require_volume_id(good) == good
    with pytest.raises(InvalidArgument):
        validation.require_volume_id("")
    for bad in (
        "../../etc",
        "/etc",
        "v-" + "0" * 31,
        "V-" + "0" * 32,
        "s-" + "0" * 32,
        good + "/",
        good + "\n",
        "v-" + "g" * 32,
        "x" * 10000,
    ):
        with pytest.raises(NotFound):
            validation.require_volume_id(bad)


def test_require_snapshot_id() -> None:
    good = "s-" + "a" * 32
    assert validation.require_snapshot_id(good) == good
    with pytest.raises(InvalidArgument):
        validation.require_snapshot_id("")
    for bad in ("v-" + "a" * 32, "../s-" + "a" * 32, "/etc/passwd"):
        with pytest.raises(NotFound):
            validation.require_snapshot_id(bad)


def test_require_path() -> None:
    assert validation.require_path("p", "/var/lib/kubelet//x/./y/") == "/var/lib/kubelet/x/y"
    assert validation.require_path("p", "/var/lib/kubelet/x..y/..z") == "/var/lib/kubelet/x..y/..z"
    for bad in (
        "",
        "relative/path",
        "/a\0b",
        "/" + "a" * 5000,
        "/var/lib/kubelet/x/../y/",  # resolved lexically, ".." could climb out of a symlink
        "/var/lib/kubelet/..",
        "/../etc",
    ):
        with pytest.raises(InvalidArgument):
            validation.require_path("p", bad)


def test_present_reports_first_missing() -> None:
    validation.present(a="x", b=1)
    with pytest.raises(InvalidArgument, match=r"^b is required$"):
        validation.present(a="x", b="", c=0)


@given(st.text(max_size=60))
def test_require_volume_id_never_accepts_non_ids(value: str) -> None:
    import re

    assume(value)
    if re.fullmatch(r"v-[0-9a-f]{32}", value):
        assert validation.require_volume_id(value) == value
    else:
        with pytest.raises(NotFound):
            validation.require_volume_id(value)


@pytest.mark.parametrize("group", ["²", "99999999999999999999999"])
def test_mount_group_must_be_a_usable_gid(group: str) -> None:
    """str.isdigit() accepts superscript digits; int("²") then raises
    ValueError in NodePublish (INTERNAL) and a huge value overflows lchown."""
    with pytest.raises(InvalidArgument):
        validation.check_capability(
            Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, mount_group=group)
        )


# --- hostile input (found by tests/hardening/test_hostile.py) ----------------------------------
def test_rw_contradicts_a_read_only_access_mode() -> None:
    ro = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_READER_ONLY)
    for flags in (("rw",), ("noatime,rw",), ("noatime", " rw ")):
        with pytest.raises(InvalidArgument, match="contradicts"):
            validation.check_capability(Capability(ro.access_type, ro.access_mode, "", flags))
    validation.check_capability(Capability(ro.access_type, ro.access_mode, "", ("ro",)))
    validation.check_capability(
        Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, "", ("rw",))
    )


def test_mount_flags_have_a_size_limit() -> None:
    validation.check_mount_flags(["noatime"] * 100)
    with pytest.raises(InvalidArgument, match="longer than"):
        validation.check_mount_flags(["noatime," * 2000])  # every part allowed, still refused


def test_require_outside_the_pool() -> None:
    pool = "/var/lib/stowage"
    validation.require_outside("p", "/var/lib/kubelet/pods/x/mount", pool)
    validation.require_outside("p", "/var/lib/stowage-other/x", pool)
    for bad in (pool, pool + "/volumes", pool + "/volumes/v-1.img", "/var/lib", "/var", "/"):
        with pytest.raises(InvalidArgument, match="overlaps"):
            validation.require_outside("p", bad, pool)


def test_sizes_beyond_int64_are_out_of_range() -> None:
    with pytest.raises(OutOfRange):
        sizing.resolve_size(CapacityRange(2**63 - 1), FsType.EXT4)
    with pytest.raises(OutOfRange):
        sizing.resolve_size(CapacityRange(2**63 - 1, 2**63 - 1), None)
    top = (2**63 - 1) // SIZE_ALIGNMENT * SIZE_ALIGNMENT
    assert sizing.resolve_size(CapacityRange(top), None) == top


def test_check_range() -> None:
    sizing.check_range(CapacityRange(0, 0))
    sizing.check_range(CapacityRange(5, 5))
    for bad in (CapacityRange(-1), CapacityRange(0, -1), CapacityRange(2, 1)):
        with pytest.raises(InvalidArgument):
            sizing.check_range(bad)
