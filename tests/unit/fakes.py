"""Test doubles for the unit tier: a scripted command runner and a fake host (sysfs loop
devices, a mount table and block-device signatures) driven entirely through that runner.

Nothing here needs root: losetup, mount, blkid and mkfs are never executed; the fake host
updates its own in-memory state when the driver "runs" them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from driver.errors import Aborted, CommandFailed
from driver.host.base import FsUsage
from driver.host.exec import DEFAULT_TIMEOUT, Result
from driver.host.fs import Filesystems
from driver.host.mountinfo import MountEntry
from driver.host.system import SystemHost
from driver.model import FsType, IoLimits
from driver.storage.locks import KeyedLocks

Handler = Callable[[list[str]], "tuple[int, str, str] | Result"]


class FakeRunner:
    """Records every argv; answers from handlers registered by argv prefix (longest wins).

    Like the real runner, `check=True` turns a non-zero exit into CommandFailed.
    """

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.checks: list[bool] = []
        self._handlers: list[tuple[tuple[str, ...], Handler]] = []

    def on(
        self,
        *prefix: str,
        rc: int = 0,
        stdout: str = "",
        stderr: str = "",
        handler: Handler | None = None,
    ) -> None:
        if handler is None:

            def handler(argv: list[str]) -> tuple[int, str, str]:
                return rc, stdout, stderr

        self._handlers.insert(0, (tuple(prefix), handler))

    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> Result:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), argv
        self.calls.append(list(argv))
        self.checks.append(check)
        best: tuple[tuple[str, ...], Handler] | None = None
        for prefix, handler in self._handlers:
            if tuple(argv[: len(prefix)]) == prefix and (
                best is None or len(prefix) > len(best[0])
            ):
                best = (prefix, handler)
        out = best[1](list(argv)) if best else (0, "", "")
        res = out if isinstance(out, Result) else Result(list(argv), *out)
        if check and res.returncode != 0:
            raise CommandFailed(list(argv), res.returncode, res.stdout, res.stderr)
        return res

    def progs(self, prog: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == prog]

    def ran(self, prog: str) -> bool:
        return bool(self.progs(prog))


def write_loop(
    sys_block: str, name: str, backing: str, *, dio: bool = True, size_bytes: int = 0
) -> str:
    d = os.path.join(sys_block, name)
    os.makedirs(os.path.join(d, "loop"), exist_ok=True)
    with open(os.path.join(d, "loop", "backing_file"), "w") as fh:
        fh.write(backing + "\n")
    with open(os.path.join(d, "loop", "dio"), "w") as fh:
        fh.write("1\n" if dio else "0\n")
    with open(os.path.join(d, "size"), "w") as fh:
        fh.write(f"{size_bytes // 512}\n")
    return "/dev/" + name


@dataclass
class FakeHost:
    """A node as seen through sysfs, /proc/self/mountinfo and the commands the driver runs."""

    sys_block: str
    runner: FakeRunner = field(default_factory=FakeRunner)
    mount_table: list[MountEntry] = field(default_factory=list)
    block_devices: dict[str, int] = field(default_factory=dict)  # device node -> rdev
    fs_error_counts: dict[str, int] = field(default_factory=dict)  # device -> kernel counter
    groups_given: list[tuple[str, int]] = field(default_factory=list)
    pod_cgroups: dict[str, int] = field(default_factory=dict)  # pod UID -> its cgroups
    io_limits: dict[tuple[str, str], IoLimits] = field(default_factory=dict)  # (pod, dev)
    signatures: dict[str, str] = field(default_factory=dict)  # device -> fs type
    image_signatures: dict[str, str] = field(default_factory=dict)  # backing file -> fs type
    blkid_error: int = 0  # non-zero: blkid exits with this status
    losetup_dio_fails: bool = False  # losetup --direct-io=on exits 1 ...
    losetup_dio_attaches: bool = False  # ... but attaches the device anyway
    next_loop: int = 900  # never collides with a real /dev/loopN
    _next_mount_id: int = 100

    def __post_init__(self) -> None:
        os.makedirs(self.sys_block, exist_ok=True)
        r = self.runner
        r.on("losetup", "--find", handler=self._losetup_find)
        r.on("losetup", "--detach", handler=self._losetup_detach)
        r.on("losetup", "--set-capacity", handler=self._losetup_capacity)
        r.on("mount", handler=self._mount)
        r.on("umount", handler=self._umount)
        r.on("blkid", handler=self._blkid)
        for prog in ("mkfs.ext4", "mkfs.xfs", "mkfs.btrfs"):
            r.on(prog, handler=self._mkfs)
        r.on("dumpe2fs", handler=self._dumpe2fs)

    # --- sysfs ------------------------------------------------------------------------------
    def _loop_dir(self, device: str) -> str:
        return os.path.join(self.sys_block, os.path.basename(device))

    def add_loop(self, backing: str, *, dio: bool = True) -> str:
        name = f"loop{self.next_loop}"
        self.next_loop += 1
        size = os.path.getsize(backing) if os.path.exists(backing) else 0
        return write_loop(self.sys_block, name, os.path.realpath(backing), dio=dio, size_bytes=size)

    def backing(self, device: str) -> str:
        try:
            with open(os.path.join(self._loop_dir(device), "loop", "backing_file")) as fh:
                return fh.read().strip()
        except FileNotFoundError:
            return ""

    def loop_devices(self) -> list[str]:
        return sorted("/dev/" + n for n in os.listdir(self.sys_block) if n.startswith("loop"))

    def _losetup_find(self, argv: list[str]) -> tuple[int, str, str]:
        image = argv[-1]
        dio = "--direct-io=on" in argv
        if dio and self.losetup_dio_fails:
            if self.losetup_dio_attaches:
                self.add_loop(image, dio=False)
            return 1, "", "losetup: failed to set direct io"
        dev = self.add_loop(image, dio=dio)
        return 0, dev + "\n", ""

    def _losetup_detach(self, argv: list[str]) -> tuple[int, str, str]:
        d = self._loop_dir(argv[-1])
        for root, dirs, files in os.walk(d, topdown=False):
            for f in files:
                os.unlink(os.path.join(root, f))
            for x in dirs:
                os.rmdir(os.path.join(root, x))
        os.rmdir(d)
        return 0, "", ""

    def _losetup_capacity(self, argv: list[str]) -> tuple[int, str, str]:
        d = self._loop_dir(argv[-1])
        with open(os.path.join(d, "loop", "backing_file")) as fh:
            backing = fh.read().strip()
        with open(os.path.join(d, "size"), "w") as fh:
            fh.write(f"{os.path.getsize(backing) // 512}\n")
        return 0, "", ""

    # --- mount table ----------------------------------------------------------------------------
    def add_mount(
        self,
        source: str,
        target: str,
        fs_type: str = "ext4",
        options: tuple[str, ...] = ("rw",),
        root: str = "/",
    ) -> MountEntry:
        self._next_mount_id += 1
        e = MountEntry(
            self._next_mount_id,
            1,
            0,
            0,
            root,
            os.path.normpath(target),
            options,
            fs_type,
            source,
            ("rw",),
        )
        self.mount_table.append(e)
        return e

    # --- driver.host.base.Host -------------------------------------------------------------------
    def mounts(self) -> list[MountEntry]:
        return list(self.mount_table)

    def rdev(self, path: str) -> int | None:
        return self.block_devices.get(path)

    def fs_usage(self, mount_point: str) -> FsUsage:
        return SystemHost().fs_usage(mount_point)  # a directory under tmp_path: harmless

    def fs_errors(self, device: str, fs_type: FsType | None) -> int:
        return self.fs_error_counts.get(device, 0)

    def give_group(self, root: str, gid: int) -> None:
        self.groups_given.append((root, gid))

    def set_io_limits(self, pod_uid: str, device: str, limits: IoLimits) -> int:
        """Records the limits per (pod, device); a pod in `pod_cgroups` has that many cgroups,
        any other none (not started)."""
        count = self.pod_cgroups.get(pod_uid, 0)
        if count:
            self.io_limits[(pod_uid, device)] = limits
        return count

    def top(self, target: str) -> MountEntry | None:
        at = [m for m in self.mount_table if m.mount_point == os.path.normpath(target)]
        return at[-1] if at else None

    def _mount(self, argv: list[str]) -> tuple[int, str, str]:
        rest = argv[argv.index("--") + 1 :]
        head = argv[1 : argv.index("--")]
        if head[:1] == ["--bind"]:
            src, tgt = rest
            under = self.top(src)
            if under is not None:
                self.add_mount(under.source, tgt, under.fs_type, under.options, under.root)
            else:  # a device node bound onto a file
                self.add_mount("udev", tgt, "devtmpfs", ("rw",), "/" + os.path.basename(src))
            return 0, "", ""
        if head[:1] == ["-o"] and head[1].startswith("remount"):
            (tgt,) = rest
            top = self.top(tgt)
            if top is None:
                return 32, "", "not mounted"
            self.mount_table[self.mount_table.index(top)] = replace(
                top, options=tuple(head[1].split(","))
            )
            return 0, "", ""
        src, tgt = rest
        fs_type = head[head.index("-t") + 1]
        opts = tuple(head[head.index("-o") + 1].split(",")) if "-o" in head else ("rw",)
        self.add_mount(src, tgt, fs_type, opts)
        return 0, "", ""

    def _umount(self, argv: list[str]) -> tuple[int, str, str]:
        top = self.top(argv[-1])
        if top is None:
            return 32, "", "not mounted"
        self.mount_table.remove(top)
        return 0, "", ""

    # --- block devices ---------------------------------------------------------------------------
    def _blkid(self, argv: list[str]) -> tuple[int, str, str]:
        if self.blkid_error:
            return self.blkid_error, "", "blkid: error"
        fs = self.signatures.get(argv[-1]) or self.image_signatures.get(self.backing(argv[-1]))
        if fs is None:
            return 2, "", ""
        return 0, f"DEVNAME={argv[-1]}\nTYPE={fs}\n", ""

    def _mkfs(self, argv: list[str]) -> tuple[int, str, str]:
        # the signature lives in the image: it survives detaching and re-attaching
        self.image_signatures[self.backing(argv[-1])] = argv[0].split(".", 1)[1]
        return 0, "", ""

    def _dumpe2fs(self, argv: list[str]) -> tuple[int, str, str]:
        with open(os.path.join(self._loop_dir(argv[-1]), "size")) as fh:
            size = int(fh.read()) * 512
        return 0, f"Block count:              {size // 4096}\nBlock size:               4096\n", ""


class RecordingFilesystems(Filesystems):
    """The real Filesystems, except that freezing only records (never FIFREEZE the host)."""

    def __init__(self, runner: FakeRunner) -> None:
        super().__init__(runner)
        self.events: list[tuple[str, str]] = []
        self.left_frozen: set[str] = set()

    def thaw(self, mount_point: str) -> bool:  # type: ignore[override]
        self.events.append(("thaw-check", mount_point))
        os.close(os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY))  # as the real one does
        return mount_point in self.left_frozen

    def trim(self, mount_point: str) -> int | None:  # type: ignore[override]
        self.events.append(("trim", mount_point))
        return 0

    @contextlib.contextmanager  # type: ignore[override]
    def frozen(self, mount_point: str) -> Iterator[None]:
        self.events.append(("freeze", mount_point))
        try:
            yield
        finally:
            self.events.append(("thaw", mount_point))


class HookedConnection:
    """Stands in for a Store's write connection: `hook(sql)` runs before every statement and
    may block (to hold a COMMIT) or raise (to inject SQLITE_FULL); the rest goes to `db`."""

    def __init__(self, db: sqlite3.Connection, hook: Callable[[str], None]) -> None:
        self._real = db
        self._hook = hook

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        self._hook(sql)
        return self._real.execute(sql, *args)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def sqlite_full() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    return exc


def busy(locks: KeyedLocks, key: str) -> bool:
    """True when `key` is held: a try-lock of it is refused."""
    try:
        with locks.hold(key):
            return False
    except Aborted:
        return True
