"""Reboot simulation (issue 7, part 3): volumes staged and published, the driver killed, every
mount and loop device gone as after a reboot. kubelet then calls NodePublish without NodeStage:
the driver re-stages the right device, or fails — it never publishes an empty directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from tests.hardening.world import Placed, World, loops_of, running_world


@pytest.fixture
def world() -> Iterator[World]:
    with running_world() as w:
        yield w


def reboot(w: World) -> None:
    """kill -9 the driver, then do what a reboot does to the host: no mounts, no loops."""
    w.client.close()
    w.driver.stop(signal.SIGKILL)
    for entry in reversed(mountinfo.mounts_under(w.pool.base)):
        if entry.mount_point != w.pool.mount:
            subprocess.run(["umount", "--", entry.mount_point], check=True)
    loops = LoopManager(SubprocessRunner())
    for lo in loops.devices():
        if lo.backing_file.startswith(w.pool.mount + os.sep):
            loops.detach(lo.device)
    w.client = w.driver.start()


def assert_serves(w: World, p: Placed) -> None:
    """The target carries this volume's one loop device, with the bytes written before."""
    devices = loops_of(w.pool, p.volume_id)
    assert len(devices) == 1, devices
    if p.block:
        assert os.stat(p.target).st_rdev == os.stat(devices[0]).st_rdev
    else:
        for path in (p.staging, p.target):
            top = mountinfo.top_mount_at(path)
            assert top is not None and mountinfo.is_on(top, devices[0]), path
    assert w.digest_of(p) == p.digest


def test_publish_without_stage_after_reboot_restages_every_kind(world: World) -> None:
    placed = [
        world.place(world.create("e", fs="ext4"), fs="ext4"),
        world.place(world.create("x", 320 << 20, fs="xfs"), fs="xfs"),
        world.place(world.create("b", 160 << 20, fs="btrfs"), fs="btrfs"),
        world.place(world.create("raw", block=True), block=True),
    ]
    reboot(world)
    for p in placed:
        assert mountinfo.top_mount_at(p.target) is None  # really gone
        world.client.publish(p.volume_id, p.staging, p.target, p.cap)  # no NodeStage first
        assert_serves(world, p)
    world.check_invariants()
    # And a second reboot, this time with kubelet staging first as it normally does.
    reboot(world)
    for p in placed:
        world.client.stage(p.volume_id, p.staging, p.cap)
        world.client.publish(p.volume_id, p.staging, p.target, p.cap)
        assert_serves(world, p)
    world.check_invariants()


def test_publish_after_reboot_fails_rather_than_bind_an_empty_dir(world: World) -> None:
    gone = world.place(world.create("gone", fs="ext4"))
    other = world.place(world.create("other", fs="ext4"))
    reboot(world)
    # 1. The image vanished while the node was down: nothing to stage, nothing to publish.
    image = os.path.join(world.pool.mount, "volumes", gone.volume_id + ".img")
    aside = os.path.join(world.pool.base, "aside.img")
    shutil.move(image, aside)
    world.client.close()
    world.driver.stop()
    world.client = world.driver.start()  # (reconcile reports the missing image)
    with pytest.raises(grpc.RpcError) as err:
        world.client.publish(gone.volume_id, gone.staging, gone.target, gone.cap)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert mountinfo.top_mount_at(gone.target) is None
    assert mountinfo.top_mount_at(gone.staging) is None
    # 2. Another volume's filesystem sits on the staging path: refuse, never bind it.
    world.client.stage(other.volume_id, other.staging, other.cap)
    os.makedirs(gone.staging, exist_ok=True)
    subprocess.run(["mount", "--bind", other.staging, gone.staging], check=True)
    try:
        shutil.move(aside, image)
        with pytest.raises(grpc.RpcError) as err:
            world.client.publish(gone.volume_id, gone.staging, gone.target, gone.cap)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert mountinfo.top_mount_at(gone.target) is None
        assert loops_of(world.pool, gone.volume_id) == []  # the refused stage detached its loop
    finally:
        subprocess.run(["umount", gone.staging], check=True)
    # Once the staging path is clear, the same call re-stages the right device.
    world.client.publish(gone.volume_id, gone.staging, gone.target, gone.cap)
    world.client.publish(other.volume_id, other.staging, other.target, other.cap)
    for p in (gone, other):
        assert_serves(world, p)
    assert world.check().ok


def test_publish_when_the_staging_mount_vanished_under_a_running_driver(world: World) -> None:
    """The records still say staged (no restart, no reconciliation), the host says otherwise:
    publish must notice through mountinfo and stage again, not bind the empty directory."""
    p = world.place(world.create("v", fs="ext4"))
    world.client.unpublish(p.volume_id, p.target)
    subprocess.run(["umount", "--", p.staging], check=True)
    for dev in loops_of(world.pool, p.volume_id):
        LoopManager(SubprocessRunner()).detach(dev)
    assert os.listdir(p.staging) == []  # what a bind would expose
    world.client.publish(p.volume_id, p.staging, p.target, p.cap)
    assert_serves(world, p)
    world.check_invariants()
