"""ModifyVolume's I/O limits on the real host (issue 18): fio with direct I/O in a test-made pod
cgroup, through the volume's loop device, sees the limit the driver wrote; a modify of an
unpublished volume applies at the publish, a modify of a published one at once, a container
started after a driver restart gets it from reconciliation, and `unlimited` lifts it.

The tolerance is generous (a behaviour check on a shared machine, not a performance figure: the
figure is `make bench`'s): blk-throttle never lets a cgroup run above its limit for long, so the
upper bound is close; the lower bound only says the limit is the one in force."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from driver import CONTEXT_POD_UID
from driver.ctl.client import block_cap
from harness import wait_for
from tests.integration.helpers import MiB
from tests.podcgroup import PodCgroup, read_iops

RIOPS = "stowage.csi.io/read-iops"
SECONDS = 2.0


def _holds(measured: float, limit: int) -> bool:
    return 0.6 * limit <= measured <= 1.15 * limit


@pytest.fixture
def pod() -> Iterator[PodCgroup]:
    cg = PodCgroup()
    try:
        yield cg
    finally:
        cg.remove()


def test_read_iops_limit_holds_in_the_pods_cgroup(pool, driver, client, pod) -> None:
    vol = client.create_volume("limited", 128 * MiB, block_cap())
    vid = vol.volume_id
    staging = os.path.join(pool.base, "staging")
    target = os.path.join(pool.base, "target")
    os.makedirs(staging)
    app = pod.container("app")
    client.modify_volume(vid, {RIOPS: "200"})  # not published: kept for the publish
    client.stage(vid, staging, block_cap())
    client.publish(vid, staging, target, block_cap(), context={CONTEXT_POD_UID: pod.uid})
    try:
        assert pod.limit_file(app).split()[-1] in ("200", "riops=200")
        measured = read_iops(pod, app, target, SECONDS)
        assert _holds(measured, 200), f"{measured:.0f} IOPS under a 200 IOPS limit"

        client.modify_volume(vid, {RIOPS: "400"})  # published: applied at once
        measured = read_iops(pod, app, target, SECONDS)
        assert _holds(measured, 400), f"{measured:.0f} IOPS under a 400 IOPS limit"

        # A restarted driver; a container started afterwards gets the limit from the periodic
        # re-application (cgroup v1 limits are per cgroup, not inherited).
        client.close()
        assert driver.stop() == 0
        client = driver.start()
        late = pod.container("restarted")
        wait_for(lambda: "400" in pod.limit_file(late), 30, "the limit in a new container")
        measured = read_iops(pod, late, target, SECONDS)
        assert _holds(measured, 400), f"{measured:.0f} IOPS after a restart, limit 400"

        client.modify_volume(vid, {RIOPS: "unlimited"})
        measured = read_iops(pod, app, target, SECONDS)
        assert measured > 2 * 400, f"{measured:.0f} IOPS with the limit lifted"
    finally:
        client.unpublish(vid, target)
        client.unstage(vid, staging)
        client.delete_volume(vid)
        client.close()
