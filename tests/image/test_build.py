"""`make image` for real (slow, root; `make test-image` sets STOWAGE_IMAGE_BUILD=1): two cold
builds with separate caches and a warm one give one digest; skopeo reads the archive; umoci
unpacks the layout and the unpacked rootfs runs stowage-csi as the image's user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .util import IMAGE_DIR, REPO, ctr_import, node_bin

# Collected only by `make test-image` (tests/conftest.py), which runs as root.


def build(out: Path, cache: Path) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(IMAGE_DIR / "build.py"), "build", "--out", str(out),
         "--cache", str(cache)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    took = time.monotonic() - started
    print(proc.stderr, end="")
    return proc.stdout.strip().splitlines()[-1], took


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("image")
    a, took_a = build(tmp / "a", tmp / "cache-a")
    b, took_b = build(tmp / "b", tmp / "cache-b")
    c, took_c = build(tmp / "c", tmp / "cache-a")
    print(f"cold {took_a:.0f}s, cold {took_b:.0f}s, warm {took_c:.0f}s")
    assert a == b == c, f"digests differ: {a} {b} {c}"
    assert (tmp / "a" / "stowage-csi-0.1.0.oci.tar").read_bytes() == (
        tmp / "b" / "stowage-csi-0.1.0.oci.tar"
    ).read_bytes()
    return tmp / "a", a


def test_skopeo_reads_the_archive(built: tuple[Path, str]) -> None:
    out, digest = built
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{out}/stowage-csi-0.1.0.oci.tar"],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert info["Digest"] == digest
    assert info["Labels"]["org.opencontainers.image.version"] == "0.1.0"
    assert len(info["Layers"]) == 3
    raw = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", f"oci:{out}/oci:0.1.0"],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert raw["config"]["Entrypoint"] == ["stowage-csi"]
    assert raw["config"]["User"] == "65532:65532"


def test_unpacked_rootfs_runs_the_driver(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{out}/oci:0.1.0", str(bundle)],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        rootfs = str(bundle / "rootfs")
        config = json.loads((bundle / "config.json").read_text())
        assert config["process"]["user"]["uid"] == 65532
        assert config["process"]["args"] == ["stowage-csi", "--help"]
        user = ["chroot", "--userspec=65532:65532", rootfs]
        version = subprocess.run(
            [*user, "/usr/local/bin/stowage-csi", "--version"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert version.stdout.strip() == "stowage-csi 0.1.0"
        imports = "import grpc, kubernetes, prometheus_client, driver.csi.server; print('ok')"
        ok = subprocess.run(
            [*user, "/usr/bin/python3", "-c", imports], check=True, capture_output=True, text=True
        )
        assert ok.stdout.strip() == "ok"
        for tool in ("mkfs.ext4", "e2fsck", "dumpe2fs", "resize2fs", "mkfs.xfs", "xfs_growfs",
                     "mkfs.btrfs", "btrfs", "blkid", "losetup", "mount", "umount"):  # fmt: skip
            found = [d for d in ("usr/sbin", "usr/bin", "sbin", "bin") if
                     os.path.lexists(f"{rootfs}/{d}/{tool}")]  # fmt: skip
            assert found, f"{tool} is not in the image"
        for gone in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log"):
            left = [p for p in Path(rootfs, gone).rglob("*") if p.is_file()]
            assert not left, left
        assert not Path(rootfs, "usr/share/perl").exists()  # perl-base only, no perl
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


def test_ctr_imports_the_archive(built: tuple[Path, str], tmp_path: Path) -> None:
    if not (node_bin("containerd") and node_bin("ctr")):
        pytest.skip("containerd/ctr not cached yet (tests/e2e/tools/build-node.sh builds them)")
    out, _ = built
    names = ctr_import([out / "stowage-csi-0.1.0.oci.tar"], tmp_path)
    assert "docker.io/library/stowage-csi:0.1.0" in names


def test_standin_images_run(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
    env = {**os.environ, "STOWAGE_IMAGE_CACHE": str(out.parent / "cache-a")}
    subprocess.run(
        [sys.executable, str(IMAGE_DIR / "build.py"), "standins", "--out", str(tmp_path)],
        check=True, env=env,
    )  # fmt: skip
    for prog in ("csi-node-driver-registrar", "livenessprobe"):
        archive = tmp_path / f"{prog}-standin.oci.tar"
        layout, bundle = tmp_path / f"{prog}-oci", tmp_path / f"{prog}-bundle"
        subprocess.run(
            ["skopeo", "copy", f"oci-archive:{archive}", f"oci:{layout}:t"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:t", str(bundle)],
            check=True, capture_output=True,
        )  # fmt: skip
        config = json.loads((bundle / "config.json").read_text())
        assert config["process"]["args"] == [f"/{prog}"]
        helped = subprocess.run(
            ["chroot", str(bundle / "rootfs"), f"/{prog}", "--help"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert "stand-in" in helped.stdout and "--csi-address" in helped.stdout
        shutil.rmtree(bundle)
    if node_bin("containerd") and node_bin("ctr"):
        names = ctr_import(sorted(tmp_path.glob("*-standin.oci.tar")), tmp_path / "ctd")
        assert "registry.local/stowage-e2e/livenessprobe-standin:v2.19.0" in names


def test_the_repo_lock_is_what_was_built() -> None:
    assert (REPO / "deploy" / "image" / "debian.lock").read_text().count("\npackage ") > 50
