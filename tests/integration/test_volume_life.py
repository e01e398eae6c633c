"""Real loop devices, mkfs, mounts and reflinks on an XFS pool: data is kept, bytes are exact."""

from __future__ import annotations

import os
import signal
import stat
import subprocess

import grpc
import pytest

from driver.ctl.client import block_cap, capability, mount_cap
from driver.host import mountinfo
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from tests.integration.helpers import MiB, Mounted, sha256, write_random

FILESYSTEMS = ["ext4", "xfs", "btrfs"]


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status", encoding="ascii") as fh:
        eff = next(line for line in fh if line.startswith("CapEff:")).split()[1]
    return bool(int(eff, 16) & (1 << 24))


def _loops_for(pool_mount: str) -> list[str]:
    return [
        lo.device
        for lo in LoopManager(SubprocessRunner()).devices()
        if lo.backing_file.startswith(pool_mount + os.sep)
    ]


@pytest.mark.parametrize("fs_type", FILESYSTEMS)
def test_data_survives_unpublish_unstage_restart_restage(fs_type, pool, driver, client):
    vol = client.create_volume(f"keep-{fs_type}", 512 * MiB, mount_cap(fs_type))
    m = Mounted(client, pool.base, vol.volume_id, fs_type=fs_type).up()
    digest = write_random(os.path.join(m.target, "data"), 16)
    m.down()
    assert not mountinfo.mounts_at(m.staging)
    assert _loops_for(pool.mount) == []
    client.close()
    assert driver.stop() == 0
    client2 = driver.start()
    try:
        m2 = Mounted(client2, pool.base, vol.volume_id, fs_type=fs_type, tag="again").up()
        assert sha256(os.path.join(m2.target, "data")) == digest
        m2.down()
        client2.delete_volume(vol.volume_id)
    finally:
        client2.close()


def test_driver_restarts_while_a_raw_block_volume_is_published(pool, driver, client):
    """Start-up reconciliation meets the published device-node bind (a file, not a
    filesystem); the driver once failed to start there (found by `make bench`'s restart)."""
    vol = client.create_volume("blk-restart", 64 * MiB, block_cap())
    m = Mounted(client, pool.base, vol.volume_id, block=True).up()
    with open(m.target, "r+b") as dev:
        dev.write(b"stowage" * 512)
    client.close()
    assert driver.stop() == 0
    client2 = driver.start()
    try:
        assert "NotADirectoryError" not in driver.log()
        with open(m.target, "rb") as dev:
            assert dev.read(7 * 512) == b"stowage" * 512
        Mounted(client2, pool.base, vol.volume_id, block=True).down()
        assert _loops_for(pool.mount) == []
        client2.delete_volume(vol.volume_id)
    finally:
        client2.close()


@pytest.mark.parametrize("fs_type", FILESYSTEMS)
def test_snapshot_restore_and_clone_return_exact_bytes(fs_type, pool, client):
    cap = mount_cap(fs_type)
    src = client.create_volume(f"src-{fs_type}", 512 * MiB, cap)
    with Mounted(client, pool.base, src.volume_id, fs_type=fs_type) as m:
        digest = write_random(os.path.join(m.target, "data"), 8)
        snap = client.create_snapshot(f"snap-{fs_type}", src.volume_id)  # frozen while staged
        assert snap.ready_to_use and snap.size_bytes == src.capacity_bytes
        clone = client.create_volume(f"clone-{fs_type}", 512 * MiB, cap, volume=src.volume_id)
        # Overwrite the source after the snapshot and the clone: neither may see it.
        write_random(os.path.join(m.target, "data"), 8)
    restored = client.create_volume(
        f"restored-{fs_type}", 1024 * MiB, cap, snapshot=snap.snapshot_id
    )
    assert restored.capacity_bytes == 1024 * MiB
    for vid, tag in ((restored.volume_id, "r"), (clone.volume_id, "c")):
        with Mounted(client, pool.base, vid, fs_type=fs_type, tag=tag) as m:
            assert sha256(os.path.join(m.target, "data")) == digest
            if vid == restored.volume_id:  # restore into a larger volume grows the filesystem
                st = os.statvfs(m.target)
                assert st.f_blocks * st.f_frsize > 700 * MiB
    for vid in (restored.volume_id, clone.volume_id, src.volume_id):
        client.delete_volume(vid)
    client.delete_snapshot(snap.snapshot_id)
    assert os.listdir(os.path.join(pool.mount, "volumes")) == []
    assert os.listdir(os.path.join(pool.mount, "snapshots")) == []


@pytest.mark.parametrize("fs_type", FILESYSTEMS)
def test_expansion_online_and_offline(fs_type, pool, client):
    cap = mount_cap(fs_type)
    vol = client.create_volume(f"grow-{fs_type}", 512 * MiB, cap)
    m = Mounted(client, pool.base, vol.volume_id, fs_type=fs_type).up()
    digest = write_random(os.path.join(m.target, "data"), 4)
    # Online: controller then node, as the external-resizer and kubelet do.
    assert client.expand_volume(vol.volume_id, 1024 * MiB) == 1024 * MiB
    if fs_type == "ext4" and not _has_cap_sys_resource():
        # The kernel needs CAP_SYS_RESOURCE to resize a mounted ext4; without it the driver
        # must say so clearly, keep the data, and finish the growth at the next stage.
        with pytest.raises(grpc.RpcError) as err:
            client.node_expand(vol.volume_id, m.target, 1024 * MiB)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "CAP_SYS_RESOURCE" in err.value.details()
        m.down()
        m = Mounted(client, pool.base, vol.volume_id, fs_type=fs_type, tag="regrow").up()
    else:
        assert client.node_expand(vol.volume_id, m.target, 1024 * MiB) == 1024 * MiB
    st = os.statvfs(m.target)
    assert st.f_blocks * st.f_frsize > 900 * MiB
    assert sha256(os.path.join(m.target, "data")) == digest
    m.down()
    # Offline, as the kubelet does it: ControllerExpandVolume only answers the size (the image
    # stays as it is); after the next NodeStageVolume the kubelet calls NodeExpandVolume on the
    # staging path, then publishes.
    assert client.expand_volume(vol.volume_id, 1536 * MiB) == 1536 * MiB
    image = os.path.join(pool.mount, "volumes", vol.volume_id + ".img")
    assert os.stat(image).st_size == 1024 * MiB
    m2 = Mounted(client, pool.base, vol.volume_id, fs_type=fs_type, tag="after")
    client.stage(vol.volume_id, m2.staging, m2.cap)
    if fs_type == "ext4" and not _has_cap_sys_resource():
        with pytest.raises(grpc.RpcError) as err:
            client.node_expand(vol.volume_id, m2.staging, 1536 * MiB)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.unstage(vol.volume_id, m2.staging)
        client.stage(vol.volume_id, m2.staging, m2.cap)  # grows ext4 offline
    assert client.node_expand(vol.volume_id, m2.staging, 1536 * MiB) == 1536 * MiB
    assert os.stat(image).st_size == 1536 * MiB
    client.publish(vol.volume_id, m2.staging, m2.target, m2.cap, False)
    try:
        st = os.statvfs(m2.target)
        assert st.f_blocks * st.f_frsize > 1400 * MiB
        assert sha256(os.path.join(m2.target, "data")) == digest
        stats = client.stats(vol.volume_id, m2.target)
        assert stats.usage[0].total == st.f_blocks * st.f_frsize
        assert not stats.volume_condition.abnormal
    finally:
        m2.down()
    client.delete_volume(vol.volume_id)


def test_block_volume_reads_back_what_was_written(pool, client):
    cap = block_cap()
    vol = client.create_volume("raw", 64 * MiB, cap)
    with Mounted(client, pool.base, vol.volume_id, block=True) as m:
        assert stat.S_ISBLK(os.stat(m.target).st_mode)
        payload = os.urandom(4 * MiB)
        fd = os.open(m.target, os.O_RDWR)
        try:
            os.pwrite(fd, payload, 8 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    # A snapshot of the raw volume carries the bytes; so does a re-stage of the original.
    snap = client.create_snapshot("raw-snap", vol.volume_id)
    copy = client.create_volume("raw-copy", 64 * MiB, cap, snapshot=snap.snapshot_id)
    for vid in (vol.volume_id, copy.volume_id):
        with Mounted(client, pool.base, vid, block=True, tag=vid[-6:]) as m:
            fd = os.open(m.target, os.O_RDONLY)
            try:
                assert os.pread(fd, 4 * MiB, 8 * MiB) == payload
            finally:
                os.close(fd)
            stats = client.stats(vid, m.target)
            assert stats.usage[0].total == 64 * MiB
    client.delete_volume(copy.volume_id)
    client.delete_snapshot(snap.snapshot_id)
    client.delete_volume(vol.volume_id)


def test_one_loop_device_per_image_and_direct_io(pool, client):
    vol = client.create_volume("one-loop", 64 * MiB, block_cap())
    m = Mounted(client, pool.base, vol.volume_id, block=True).up()
    client.stage(vol.volume_id, m.staging, m.cap)  # idempotent retry
    second = os.path.join(pool.base, "target-second")
    client.publish(vol.volume_id, m.staging, second, m.cap)
    loops = LoopManager(SubprocessRunner()).devices()
    ours = [lo for lo in loops if lo.backing_file.endswith(vol.volume_id + ".img")]
    assert len(ours) == 1
    assert ours[0].direct_io, "direct I/O should be on for a 4096-byte-sector loop on XFS"
    client.unpublish(vol.volume_id, second)
    m.down()
    client.delete_volume(vol.volume_id)


def test_read_only_publish_refuses_writes_and_mounts_nosuid_nodev(pool, client):
    vol = client.create_volume("ro", 64 * MiB, mount_cap())
    m = Mounted(client, pool.base, vol.volume_id).up()
    ro_target = os.path.join(pool.base, "target-ro")
    client.publish(vol.volume_id, m.staging, ro_target, m.cap, readonly=True)
    with pytest.raises(OSError):
        open(os.path.join(ro_target, "nope"), "w").close()
    for path in (m.staging, m.target, ro_target):
        opts = mountinfo.mounts_at(path)[-1].options
        assert "nosuid" in opts and "nodev" in opts, (path, opts)
    assert "ro" in mountinfo.mounts_at(ro_target)[-1].options
    client.unpublish(vol.volume_id, ro_target)
    assert not os.path.exists(ro_target)
    m.down()
    client.delete_volume(vol.volume_id)


def test_volume_mount_group_sets_group_ownership(pool, client):
    cap = mount_cap()
    cap.mount.volume_mount_group = "4321"
    vol = client.create_volume("group", 64 * MiB, mount_cap())
    staging = os.path.join(pool.base, "staging-group")
    target = os.path.join(pool.base, "target-group")
    os.makedirs(staging)
    client.stage(vol.volume_id, staging, mount_cap())
    client.publish(vol.volume_id, staging, target, cap)
    st = os.stat(target)
    assert st.st_gid == 4321 and st.st_mode & stat.S_ISGID
    client.unpublish(vol.volume_id, target)
    client.unstage(vol.volume_id, staging)
    client.delete_volume(vol.volume_id)


def test_publish_after_reboot_restages_the_right_device(pool, driver, client):
    """Rule 7: kubelet may call NodePublish without NodeStage after a reboot."""
    vol = client.create_volume("reboot", 128 * MiB, mount_cap())
    m = Mounted(client, pool.base, vol.volume_id).up()
    digest = write_random(os.path.join(m.target, "data"), 4)
    client.close()
    driver.stop(signal.SIGKILL)
    # What a reboot does: every mount gone, every loop device detached.
    subprocess.run(["umount", m.target], check=True)
    subprocess.run(["umount", m.staging], check=True)
    for dev in _loops_for(pool.mount):
        subprocess.run(["losetup", "-d", dev], check=True)
    c = driver.start()
    try:
        c.publish(vol.volume_id, m.staging, m.target, m.cap)  # no NodeStage first
        top = mountinfo.mounts_at(m.staging)[-1]
        loop = [
            lo
            for lo in LoopManager(SubprocessRunner()).devices()
            if lo.backing_file.endswith(vol.volume_id + ".img")
        ]
        assert len(loop) == 1 and top.dev == os.stat(loop[0].device).st_rdev
        assert sha256(os.path.join(m.target, "data")) == digest
        c.unpublish(vol.volume_id, m.target)
        c.unstage(vol.volume_id, m.staging)
        c.delete_volume(vol.volume_id)
    finally:
        c.close()


def test_orphans_go_to_trash_and_missing_pool_is_not_ready(pool, driver, client):
    vol = client.create_volume("real", 64 * MiB, mount_cap())
    client.close()
    driver.stop(signal.SIGKILL)
    orphan = os.path.join(pool.mount, "volumes", "v-" + "ab" * 16 + ".img")
    with open(orphan, "wb") as fh:
        fh.truncate(MiB)
    c = driver.start()
    try:
        assert not os.path.exists(orphan)
        assert any("ab" * 16 in name for name in os.listdir(os.path.join(pool.mount, "trash")))
        assert [e.volume.volume_id for e in c.list_volumes()] == [vol.volume_id]
        # A pool that disappears makes Probe not-ready and pool calls UNAVAILABLE, never "gone".
        os.rename(os.path.join(pool.mount, "volumes"), os.path.join(pool.mount, "volumes.away"))
        from csi_proto import csi_pb2

        assert not c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        with pytest.raises(grpc.RpcError) as err:
            c.delete_volume(vol.volume_id)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        os.rename(os.path.join(pool.mount, "volumes.away"), os.path.join(pool.mount, "volumes"))
        c.delete_volume(vol.volume_id)
    finally:
        c.close()


def test_never_formats_a_device_that_has_a_signature(pool, driver, client):
    """Rule 1: metadata says unformatted, but blkid sees a filesystem: refuse, keep the bytes."""
    vol = client.create_volume("signed", 512 * MiB, mount_cap("ext4"))
    image = os.path.join(pool.mount, "volumes", vol.volume_id + ".img")
    subprocess.run(["mkfs.xfs", "-q", "-f", image], check=True, capture_output=True)
    before = sha256(image)
    staging = os.path.join(pool.base, "staging-signed")
    os.makedirs(staging)
    with pytest.raises(grpc.RpcError) as err:
        client.stage(vol.volume_id, staging, mount_cap("ext4"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing to format" in err.value.details()
    assert sha256(image) == before
    assert not mountinfo.mounts_at(staging)
    client.unstage(vol.volume_id, staging)
    client.delete_volume(vol.volume_id)


def test_sigterm_stops_gracefully_and_removes_socket(pool, driver, client):
    client.close()
    assert os.path.exists(driver.socket)
    assert driver.stop(signal.SIGTERM) == 0
    assert not os.path.exists(driver.socket)


def test_metrics_endpoint(pool):
    import socket as s
    import urllib.request

    from harness import DriverProcess

    with s.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    drv = DriverProcess(pool, "--metrics-address", f"127.0.0.1:{port}")
    c = drv.start()
    try:
        vol = c.create_volume("metered", 64 * MiB, capability(False))
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        assert 'stowage_operations_total{code="OK",method="CreateVolume"} 1.0' in body
        assert "stowage_operation_duration_seconds_bucket" in body
        assert "stowage_volumes 1.0" in body
        assert "stowage_pool_capacity_bytes" in body
        assert 'stowage_loop_devices{direct_io="off"} 0.0' in body
        c.delete_volume(vol.volume_id)
    finally:
        c.close()
        drv.stop()
