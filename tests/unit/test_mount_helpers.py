"""driver.host: Filesystems (probe/format/check/grow/freeze), LoopManager against a fake
/sys/block, Mounter argv and target handling, mountinfo parsing."""

from __future__ import annotations

import os
import struct
import types

import pytest

from driver.errors import CommandFailed, FailedPrecondition, Internal, InvalidArgument
from driver.host import fs as fs_module
from driver.host import mountinfo
from driver.host.fs import FIFREEZE, FITHAW, FITRIM, Filesystems
from driver.host.loop import LoopManager
from driver.host.mounter import Mounter
from driver.model import FsType
from tests.unit.fakes import FakeHost, FakeRunner, write_loop

DEV = "/dev/loop900"
REAL_READ = mountinfo.read  # captured before the autouse fixture replaces it


# --- Filesystems.probe ---------------------------------------------------------------------------
def test_probe_nothing_found_is_none(runner: FakeRunner) -> None:
    runner.on("blkid", rc=2)
    assert Filesystems(runner).probe(DEV) is None
    assert runner.calls == [["blkid", "-p", "-o", "export", "--", DEV]]
    assert runner.checks == [False]


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        (f"DEVNAME={DEV}\nUUID=1234\nTYPE=ext4\nUSAGE=filesystem\n", "ext4"),
        ("TYPE=xfs\n", "xfs"),
        ("PTUUID=x\nPTTYPE=gpt\n", "gpt"),
        (f"DEVNAME={DEV}\nUSAGE=raid\n", "unknown"),
        ("", "unknown"),
    ],
)
def test_probe_signature(runner: FakeRunner, stdout: str, expected: str) -> None:
    runner.on("blkid", rc=0, stdout=stdout)
    assert Filesystems(runner).probe(DEV) == expected


@pytest.mark.parametrize("rc", [1, 3, 4, 8, 126, 127, -9])
def test_probe_any_other_exit_is_internal(runner: FakeRunner, rc: int) -> None:
    runner.on("blkid", rc=rc, stderr="cannot read")
    with pytest.raises(Internal):
        Filesystems(runner).probe(DEV)


def test_probe_runner_failure_propagates(runner: FakeRunner) -> None:
    def missing(argv: list[str]) -> tuple[int, str, str]:
        raise Internal("blkid is not installed on this node")

    runner.on("blkid", handler=missing)
    with pytest.raises(Internal):
        Filesystems(runner).probe(DEV)


# --- format/check/grow ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fs", "argv"),
    [
        (
            FsType.EXT4,
            [
                "mkfs.ext4",
                "-F",
                "-q",
                "-m0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                DEV,
            ],
        ),
        (FsType.XFS, ["mkfs.xfs", "-f", "-q", "-K", DEV]),
        (FsType.BTRFS, ["mkfs.btrfs", "-f", "-q", "-K", DEV]),
    ],
)
def test_format_argv(runner: FakeRunner, fs: FsType, argv: list[str]) -> None:
    Filesystems(runner).format(DEV, fs)
    assert runner.calls == [argv] and runner.checks == [True]


def test_format_failure_is_command_failed(runner: FakeRunner) -> None:
    runner.on("mkfs.xfs", rc=1, stderr="mkfs.xfs: cannot open")
    with pytest.raises(CommandFailed) as info:
        Filesystems(runner).format(DEV, FsType.XFS)
    assert info.value.returncode == 1 and "cannot open" in str(info.value)


@pytest.mark.parametrize(("rc", "ok"), [(0, True), (1, True), (2, False), (4, False), (8, False)])
def test_check_ext4(runner: FakeRunner, rc: int, ok: bool) -> None:
    runner.on("e2fsck", rc=rc)
    f = Filesystems(runner)
    if ok:
        f.check(DEV, FsType.EXT4)
    else:
        with pytest.raises(FailedPrecondition):
            f.check(DEV, FsType.EXT4)
    assert runner.calls == [["e2fsck", "-p", "--", DEV]]


def test_check_skips_xfs_and_btrfs(runner: FakeRunner) -> None:
    Filesystems(runner).check(DEV, FsType.XFS)
    Filesystems(runner).check(DEV, FsType.BTRFS)
    assert runner.calls == []


def test_grow_argv(runner: FakeRunner) -> None:
    f = Filesystems(runner)
    f.grow(DEV, "/mnt/x", FsType.EXT4)
    f.grow(DEV, "/mnt/x", FsType.XFS)
    f.grow(DEV, "/mnt/x", FsType.BTRFS)
    assert runner.calls == [
        ["resize2fs", "--", DEV],
        ["xfs_growfs", "/mnt/x"],
        ["btrfs", "filesystem", "resize", "max", "/mnt/x"],
    ]


def test_grow_ext4_errors(runner: FakeRunner) -> None:
    runner.on("resize2fs", rc=1, stderr="resize2fs: Permission denied to resize filesystem")
    with pytest.raises(FailedPrecondition):
        Filesystems(runner).grow(DEV, "/m", FsType.EXT4)
    runner.on("resize2fs", rc=1, stderr="resize2fs: Bad magic number")
    with pytest.raises(CommandFailed):
        Filesystems(runner).grow(DEV, "/m", FsType.EXT4)


def test_grow_offline(runner: FakeRunner) -> None:
    f = Filesystems(runner)
    f.grow_offline(DEV, FsType.EXT4)
    assert runner.calls == [["e2fsck", "-f", "-p", "--", DEV], ["resize2fs", "--", DEV]]
    runner.calls.clear()
    runner.on("e2fsck", rc=4)
    with pytest.raises(FailedPrecondition):
        f.grow_offline(DEV, FsType.EXT4)
    assert not runner.ran("resize2fs")
    with pytest.raises(InvalidArgument):
        f.grow_offline(DEV, FsType.XFS)


def test_ext4_size_from_dumpe2fs(runner: FakeRunner) -> None:
    runner.on(
        "dumpe2fs",
        stdout="dumpe2fs 1.47\nBlock count:   2560\nBlock size:   4096\n"
        "Filesystem volume name:   <none>\n",
    )
    assert Filesystems(runner).ext4_size(DEV) == 2560 * 4096


def test_frozen_always_thaws(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(
        fs_module, "fcntl", types.SimpleNamespace(ioctl=lambda fd, op, arg: calls.append(op))
    )
    with pytest.raises(RuntimeError), Filesystems.frozen(str(tmp_path)):
        assert calls == [FIFREEZE]
        raise RuntimeError("copy failed")
    assert calls == [FIFREEZE, FITHAW]


def test_frozen_failure_is_internal_and_does_not_thaw(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def ioctl(fd: int, op: int, arg: int) -> None:
        calls.append(op)
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fs_module, "fcntl", types.SimpleNamespace(ioctl=ioctl))
    ran = []
    with pytest.raises(Internal), Filesystems.frozen(str(tmp_path)):
        ran.append(1)
    assert calls == [FIFREEZE] and ran == []


def test_trim_reports_bytes_and_tolerates_devices_without_discard(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int, int]] = []

    def trims(fd: int, op: int, arg: bytearray, mutate: bool) -> None:
        assert op == FITRIM and mutate
        seen.append(struct.unpack("=QQQ", arg))
        arg[8:16] = struct.pack("=Q", 12345)  # the kernel writes back what it trimmed

    monkeypatch.setattr(fs_module, "fcntl", types.SimpleNamespace(ioctl=trims))
    assert Filesystems.trim(str(tmp_path)) == 12345
    assert seen == [(0, (1 << 64) - 1, 0)]  # the whole filesystem

    def unsupported(fd: int, op: int, arg: bytearray, mutate: bool) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fs_module, "fcntl", types.SimpleNamespace(ioctl=unsupported))
    assert Filesystems.trim(str(tmp_path)) is None

    def broken(fd: int, op: int, arg: bytearray, mutate: bool) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs_module, "fcntl", types.SimpleNamespace(ioctl=broken))
    with pytest.raises(Internal, match="could not trim"):
        Filesystems.trim(str(tmp_path))


# --- LoopManager ----------------------------------------------------------------------------------
@pytest.fixture
def sysb(tmp_path: os.PathLike[str]) -> str:
    d = os.path.join(str(tmp_path), "sys")
    os.mkdir(d)
    return d


@pytest.fixture
def image(tmp_path: os.PathLike[str]) -> str:
    p = os.path.join(str(tmp_path), "pool", "volumes", "v.img")
    os.makedirs(os.path.dirname(p))
    with open(p, "wb") as fh:
        fh.truncate(8 << 20)
    return p


def test_devices_and_find(sysb: str, image: str, runner: FakeRunner) -> None:
    write_loop(sysb, "loop3", image, dio=True, size_bytes=8 << 20)
    write_loop(sysb, "loop4", image + " (deleted)", dio=False)
    write_loop(sysb, "loop5", "/other.img")
    os.makedirs(os.path.join(sysb, "loop6", "loop"))  # an unused loop device: no backing file
    os.makedirs(os.path.join(sysb, "sda"))
    lm = LoopManager(runner, sys_block=sysb)
    devs = {d.device: d for d in lm.devices()}
    assert sorted(devs) == ["/dev/loop3", "/dev/loop4", "/dev/loop5"]
    assert devs["/dev/loop3"].direct_io and not devs["/dev/loop3"].deleted
    assert devs["/dev/loop4"].backing_file == image and devs["/dev/loop4"].deleted
    assert not devs["/dev/loop4"].direct_io
    assert [d.device for d in lm.find(image)] == ["/dev/loop3"]  # deleted ones never match
    assert lm.find(os.path.join(os.path.dirname(image), ".", "v.img"))[0].device == "/dev/loop3"
    assert lm.size_bytes("/dev/loop3") == 8 << 20
    assert lm.size_bytes("/dev/loop99") == 0
    assert devs["/dev/loop3"].name == "loop3"
    assert runner.calls == []


def test_attach_reuses_existing_device(sysb: str, image: str, runner: FakeRunner) -> None:
    write_loop(sysb, "loop3", image)
    dev = LoopManager(runner, sys_block=sysb).attach(image, sector_size=4096)
    assert dev.device == "/dev/loop3"
    assert runner.calls == []


def test_attach_refuses_two_devices_for_one_image(
    sysb: str, image: str, runner: FakeRunner
) -> None:
    write_loop(sysb, "loop3", image)
    write_loop(sysb, "loop7", image)
    with pytest.raises(Internal):
        LoopManager(runner, sys_block=sysb).attach(image)
    assert runner.calls == []


def test_attach_new_device_argv(tmp_path: os.PathLike[str], image: str) -> None:
    host = FakeHost(sys_block=os.path.join(str(tmp_path), "sb"))
    dev = LoopManager(host.runner, sys_block=host.sys_block).attach(image, sector_size=4096)
    assert host.runner.calls == [
        ["losetup", "--find", "--show", "--sector-size=4096", "--direct-io=on", image]
    ]
    assert dev.device == "/dev/loop900" and dev.direct_io and dev.backing_file == image


def test_attach_retries_without_direct_io_when_nothing_appeared(
    tmp_path: os.PathLike[str], image: str
) -> None:
    host = FakeHost(sys_block=os.path.join(str(tmp_path), "sb"), losetup_dio_fails=True)
    dev = LoopManager(host.runner, sys_block=host.sys_block).attach(image, sector_size=512)
    assert host.runner.calls == [
        ["losetup", "--find", "--show", "--sector-size=512", "--direct-io=on", image],
        ["losetup", "--find", "--show", "--sector-size=512", image],
    ]
    assert not dev.direct_io
    assert host.loop_devices() == ["/dev/loop900"]


def test_attach_does_not_retry_when_device_appeared_despite_failure(
    tmp_path: os.PathLike[str], image: str
) -> None:
    host = FakeHost(
        sys_block=os.path.join(str(tmp_path), "sb"),
        losetup_dio_fails=True,
        losetup_dio_attaches=True,
    )
    dev = LoopManager(host.runner, sys_block=host.sys_block).attach(image)
    assert len(host.runner.calls) == 1
    assert host.loop_devices() == ["/dev/loop900"] and dev.device == "/dev/loop900"


def test_attach_failing_twice_raises(sysb: str, image: str, runner: FakeRunner) -> None:
    runner.on("losetup", rc=1, stderr="losetup: cannot find an unused loop device")
    with pytest.raises(CommandFailed):
        LoopManager(runner, sys_block=sysb).attach(image)
    assert len(runner.calls) == 2
    assert "--direct-io=on" in runner.calls[0] and "--direct-io=on" not in runner.calls[1]


def test_attach_success_without_device_is_internal(
    sysb: str, image: str, runner: FakeRunner
) -> None:
    with pytest.raises(Internal):
        LoopManager(runner, sys_block=sysb).attach(image)


def test_detach_and_refresh(sysb: str, image: str, runner: FakeRunner) -> None:
    write_loop(sysb, "loop3", image)
    lm = LoopManager(runner, sys_block=sysb)
    lm.detach("/dev/loop3")
    lm.detach("/dev/loop8")  # already gone: nothing to run
    lm.refresh_capacity("/dev/loop3")
    assert runner.calls == [
        ["losetup", "--detach", "/dev/loop3"],
        ["losetup", "--set-capacity", "/dev/loop3"],
    ]


# --- Mounter --------------------------------------------------------------------------------------
def test_mount_and_bind_argv(host: FakeHost, tmp_path: os.PathLike[str]) -> None:
    m = Mounter(host.runner, host)
    m.mount(DEV, "/k/s", FsType.XFS, ["nosuid", "nodev", "nouuid"])
    m.mount(DEV, "/k/t0", FsType.EXT4, [])
    m.bind("/k/s", "/k/t", readonly=False, options=["nosuid", "nodev"])
    assert host.runner.calls == [
        ["mount", "-t", "xfs", "-o", "nosuid,nodev,nouuid", "--", DEV, "/k/s"],
        ["mount", "-t", "ext4", "--", DEV, "/k/t0"],
        ["mount", "--bind", "--", "/k/s", "/k/t"],
        ["mount", "-o", "remount,bind,nosuid,nodev", "--", "/k/t"],
    ]
    assert m.is_mounted("/k/t") and m.is_mounted("/k/t/")


def test_bind_undone_when_remount_fails(host: FakeHost) -> None:
    m = Mounter(host.runner, host)
    host.add_mount(DEV, "/k/s")
    host.runner.on("mount", "-o", rc=32, stderr="remount failed")
    with pytest.raises(CommandFailed):
        m.bind("/k/s", "/k/t", readonly=True, options=[])
    assert host.runner.calls[-1] == ["umount", "--", "/k/t"]
    assert not m.is_mounted("/k/t")


def test_unmount_all_layers_and_give_up(host: FakeHost) -> None:
    m = Mounter(host.runner, host)
    for _ in range(3):
        host.add_mount(DEV, "/k/t")
    m.unmount("/k/t")
    assert host.runner.calls == [["umount", "--", "/k/t"]] * 3
    m.unmount("/k/t")
    assert len(host.runner.calls) == 3
    host.add_mount(DEV, "/k/stuck")
    host.runner.on("umount", rc=0)  # "succeeds" but the mount never goes away
    with pytest.raises(Internal):
        m.unmount("/k/stuck")


def test_busy_unmount_is_an_error_not_forced(host: FakeHost) -> None:
    host.add_mount(DEV, "/k/t")
    host.runner.on("umount", rc=32, stderr="target is busy")
    with pytest.raises(CommandFailed):
        Mounter(host.runner, host).unmount("/k/t")
    assert all("-l" not in c and "-f" not in c for c in host.runner.calls)


def test_ensure_dir_and_file_refuse_symlinks(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    d, f, link = os.path.join(base, "d"), os.path.join(base, "f"), os.path.join(base, "link")
    Mounter.ensure_dir(d)
    Mounter.ensure_dir(d)
    Mounter.ensure_file(f)
    Mounter.ensure_file(f)
    assert os.path.isdir(d) and os.path.isfile(f)
    os.symlink("/etc", link)
    with pytest.raises(InvalidArgument):
        Mounter.ensure_dir(link)
    with pytest.raises(InvalidArgument):
        Mounter.ensure_file(link)
    with pytest.raises(InvalidArgument):
        Mounter.ensure_dir(f)
    with pytest.raises(InvalidArgument):
        Mounter.ensure_file(d)
    with pytest.raises(InvalidArgument):
        Mounter.ensure_dir(os.path.join(base, "missing", "x"))


def test_remove_target_rmdir_only(host: FakeHost, tmp_path: os.PathLike[str]) -> None:
    m = Mounter(host.runner, host)
    base = str(tmp_path)
    empty, full, afile = (os.path.join(base, n) for n in ("empty", "full", "afile"))
    os.mkdir(empty)
    os.mkdir(full)
    open(os.path.join(full, "keep"), "w").close()
    open(afile, "w").close()
    m.remove_target(empty)
    m.remove_target(afile)
    m.remove_target(os.path.join(base, "never-existed"))
    assert not os.path.exists(empty) and not os.path.exists(afile)
    with pytest.raises(FailedPrecondition):
        m.remove_target(full)
    assert os.path.exists(os.path.join(full, "keep"))
    host.add_mount(DEV, full)
    with pytest.raises(FailedPrecondition):
        m.remove_target(full)


# --- mountinfo ------------------------------------------------------------------------------------
SAMPLE = r"""
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
36 22 98:0 /mnt1 /mnt/with\040space\011tab rw,noatime master:1 - ext3 /dev/root rw,errors=continue
37 22 7:900 / /var/lib/kubelet/pv/x/globalmount rw,nosuid,nodev - xfs /dev/loop900 rw,nouuid
38 37 7:900 / /var/lib/kubelet/pods/p/mount rw shared:5 master:7 unbindable - xfs /dev/loop900 rw
39 22 7:900 / /var/lib/kubelet/pods/p/mount ro,nosuid,nodev - xfs /dev/loop900 rw
40 22 0:5 /loop901 /var/lib/kubelet/pods/p/dev/blk rw,nosuid - devtmpfs udev rw,size=1k
41 22 0:44 / /back\134slash rw - tmpfs my\040tmp rw
garbage line without separator
1 2 3 - short
"""


def test_parse_fields_escapes_and_optional_fields() -> None:
    entries = mountinfo.parse(SAMPLE)
    assert [e.mount_id for e in entries] == [22, 36, 37, 38, 39, 40, 41]
    e = entries[1]
    assert e.mount_point == "/mnt/with space\ttab"
    assert (e.parent_id, e.major, e.minor, e.root) == (22, 98, 0, "/mnt1")
    assert e.options == ("rw", "noatime") and e.fs_type == "ext3" and e.source == "/dev/root"
    assert e.super_options == ("rw", "errors=continue")
    many = entries[3]  # three optional fields
    assert many.fs_type == "xfs" and many.source == "/dev/loop900" and many.options[0] == "rw"
    assert entries[6].mount_point == "/back\\slash" and entries[6].source == "my tmp"
    assert entries[4].read_only and not entries[3].read_only
    assert entries[2].dev == os.makedev(7, 900)


def test_stacked_mounts_oldest_first() -> None:
    entries = mountinfo.parse(SAMPLE)
    at = mountinfo.mounts_at("/var/lib/kubelet/pods/p/mount/", entries)
    assert [e.mount_id for e in at] == [38, 39]
    assert mountinfo.mounts_at("/nowhere", entries) == []


def test_top_mount_at_is_the_newest() -> None:
    entries = mountinfo.parse(SAMPLE)
    top = mountinfo.top_mount_at("/var/lib/kubelet/pods/p/mount", entries)
    assert top is not None and top.mount_id == 39
    assert mountinfo.top_mount_at("/var/lib/kubelet", entries) is None


def test_is_on_and_mounts_of() -> None:
    entries = mountinfo.parse(SAMPLE)
    by_id = {e.mount_id: e for e in entries}
    assert mountinfo.is_on(by_id[37], "/dev/loop900", rdev=0)
    assert mountinfo.is_on(by_id[40], "/dev/loop901", rdev=0)  # bind of the device node
    assert not mountinfo.is_on(by_id[40], "/dev/loop90", rdev=0)
    assert mountinfo.is_on(by_id[22], "/dev/other", rdev=os.makedev(8, 1))  # by device number
    assert not mountinfo.is_on(by_id[22], "/dev/other", rdev=os.makedev(8, 2))
    assert [e.mount_id for e in mountinfo.mounts_of("/dev/loop900", entries)] == [37, 38, 39]


def test_mounts_under_is_path_aware() -> None:
    entries = mountinfo.parse(SAMPLE)
    under = mountinfo.mounts_under("/var/lib/kubelet/pods/p", entries)
    assert [e.mount_id for e in under] == [38, 39, 40]
    assert mountinfo.mounts_under("/var/lib/kubelet/pods/", entries) == under
    assert mountinfo.mounts_under("/var/lib/kubelet/po", entries) == []


def test_read_from_file(tmp_path: os.PathLike[str]) -> None:
    p = os.path.join(str(tmp_path), "mountinfo")
    with open(p, "w") as fh:
        fh.write(SAMPLE)
    assert [e.mount_id for e in REAL_READ(p)] == [22, 36, 37, 38, 39, 40, 41]


def test_by_backing_file_groups_live_devices_in_one_pass(
    sysb: str, image: str, runner: FakeRunner
) -> None:
    write_loop(sysb, "loop3", image)
    write_loop(sysb, "loop4", image + " (deleted)")
    write_loop(sysb, "loop5", "/other.img")
    write_loop(sysb, "loop6", "/other.img")
    grouped = LoopManager(runner, sys_block=sysb).by_backing_file()
    assert {k: [d.device for d in v] for k, v in grouped.items()} == {
        image: ["/dev/loop3"],
        "/other.img": ["/dev/loop5", "/dev/loop6"],
    }
    assert runner.calls == []
