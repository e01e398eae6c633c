"""Fixtures for the unit tier: a real Store and ImagePool under tmp_path, everything that would
touch the host (loop devices, mounts, mkfs, blkid, FIFREEZE) replaced by tests/unit/fakes.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import types
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from driver.core.controller import ControllerCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.host import fs as fs_module
from driver.host import mountinfo
from driver.host.loop import LoopManager
from driver.host.mounter import Mounter
from driver.storage.image import ImagePool
from driver.storage.locks import KeyedLocks
from driver.storage.store import Store
from tests.unit.fakes import FakeHost, FakeRunner, RecordingFilesystems

NODE = "node-a"

# No example database: the unit tier must not write outside tmp_path (.hypothesis/ in the repo).
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="stowage-unit-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("stowage-unit", database=None, deadline=None)
settings.load_profile("stowage-unit")


@pytest.fixture(autouse=True)
def _no_host_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite may run as root. Core reaches the host only through the Host, Runner and
    loop interfaces, which the tests fake; these guards make anything that goes around them
    fail loudly instead of freezing a real filesystem or reading the real mount table."""

    def refuse_ioctl(*args: object) -> None:
        raise AssertionError(f"unit tests must not issue filesystem ioctls: {args!r}")

    monkeypatch.setattr(fs_module, "fcntl", types.SimpleNamespace(ioctl=refuse_ioctl))

    def refuse_read(path: str = mountinfo.MOUNTINFO) -> list[mountinfo.MountEntry]:
        if path == mountinfo.MOUNTINFO:
            raise AssertionError("unit tests must not read the host's mountinfo")
        with open(path, encoding="utf-8") as fh:
            return mountinfo.parse(fh.read())

    monkeypatch.setattr(mountinfo, "read", refuse_read)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def host(tmp_path: os.PathLike[str]) -> FakeHost:
    return FakeHost(sys_block=os.path.join(str(tmp_path), "sys-block"))


@pytest.fixture
def pool_dir(tmp_path: os.PathLike[str]) -> str:
    d = os.path.join(str(tmp_path), "pool")
    os.mkdir(d)
    return d


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(str(tmp_path), "meta.db"))
    yield s
    s.close()


def build_ctx(host: FakeHost, store: Store, pool: ImagePool, **kw: object) -> PoolContext:
    return PoolContext(
        node_id=NODE,
        store=store,
        backend=pool,
        locks=KeyedLocks(),
        loops=LoopManager(host.runner, sys_block=host.sys_block),
        mounter=Mounter(host.runner, host),
        fs=RecordingFilesystems(host.runner),
        host=host,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def ctx(host: FakeHost, store: Store, pool_dir: str) -> PoolContext:
    return build_ctx(host, store, ImagePool(pool_dir))


@pytest.fixture
def controller(ctx: PoolContext) -> ControllerCore:
    return ControllerCore(ctx)


@pytest.fixture
def node(ctx: PoolContext) -> NodeCore:
    return NodeCore(ctx)


@pytest.fixture
def kubelet(tmp_path: os.PathLike[str]) -> str:
    """A stand-in for /var/lib/kubelet: staging and target paths live under it."""
    d = os.path.join(str(tmp_path), "kubelet")
    os.mkdir(d)
    return d


@pytest.fixture
def staging(kubelet: str) -> str:
    return os.path.join(kubelet, "globalmount")


@pytest.fixture
def target(kubelet: str) -> str:
    return os.path.join(kubelet, "mount")
