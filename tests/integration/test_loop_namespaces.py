"""A loop attached from a mount namespace that is gone (the node plugin's container before a
restart or an upgrade) is still found by its image: sysfs then names the backing file only
below the root of the mount it was opened through, and LoopManager resolves that path through
this namespace's mounts, confirmed by the device and inode the kernel holds (issue 17: the
chart's driver lost its loops after `helm upgrade`)."""

from __future__ import annotations

import os
import subprocess

import pytest

from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager


@pytest.mark.root
def test_loop_attached_in_a_dead_mount_namespace_is_found_by_its_image(tmp_path) -> None:
    assert os.geteuid() == 0, "needs root (tmpfs, unshare, losetup)"
    fs, bind = tmp_path / "fs", tmp_path / "bind"
    fs.mkdir()
    bind.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fs)], check=True)
    loops = LoopManager(SubprocessRunner())
    device = ""
    try:
        (fs / "volumes").mkdir()
        image = fs / "volumes" / "v.img"
        with open(image, "wb") as fh:
            fh.truncate(4 << 20)
        # attach through a bind mount private to a namespace that ends with the command
        script = f"mount --bind {fs} {bind} && losetup --find --show {bind}/volumes/v.img"
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                             check=True, capture_output=True, text=True)  # fmt: skip
        device = out.stdout.strip()
        name = os.path.basename(device)
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as fh:
            assert fh.read().strip() == "/volumes/v.img"  # what a restarted driver reads
        found = loops.find(str(image))
        assert [d.device for d in found] == [device]
        assert found[0].backing_file == str(image)
        listed = [d for d in loops.devices() if d.device == device]
        assert listed and listed[0].backing_file == str(image)
        assert loops.attach(str(image), direct_io=False).device == device  # reused, not a second
    finally:
        if device:
            loops.detach(device)
        subprocess.run(["umount", str(fs)], check=False)
