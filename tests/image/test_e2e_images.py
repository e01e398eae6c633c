"""tests/e2e/tools/build-images.sh: the Go-built sidecars as single-binary images, tried with a
dummy static binary in place of each sidecar (the real ones are packaged the same way)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .util import REPO, ctr_import, node_bin

SIDECARS = ("csi-provisioner", "csi-resizer", "csi-snapshotter", "snapshot-controller")
DUMMY = Path("/usr/bin/catatonit")  # static; prints its version for --version


def image_files(archive: Path) -> tuple[dict[str, object], dict[str, bytes]]:
    """(config, {path: content}) of a one-layer image archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            fh = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert fh is not None
            return fh.read()

        fh = tar.extractfile("index.json")
        assert fh is not None
        index = json.loads(fh.read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        files = {}
        with tarfile.open(fileobj=io.BytesIO(blob(manifest["layers"][0]["digest"]))) as layer:
            for m in layer:
                if m.isreg():
                    fh = layer.extractfile(m)
                    assert fh is not None
                    files[m.name] = fh.read()
        return config, files


@pytest.fixture
def images(tmp_path: Path) -> Path:
    if not DUMMY.exists():
        pytest.skip("no static dummy binary (catatonit, installed by build-node.sh)")
    bin_dir, out = tmp_path / "bin", tmp_path / "images"
    bin_dir.mkdir()
    for prog in SIDECARS[:3]:  # snapshot-controller "not built yet": skipped, not an error
        shutil.copy(DUMMY, bin_dir / prog)
    (tmp_path / "versions").write_text("csi-provisioner v9.9.9\n")
    proc = subprocess.run(
        [str(REPO / "tests/e2e/tools/build-images.sh"), "--bin", str(bin_dir), "--out", str(out),
         "--no-standins"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "skipped: snapshot-controller" in proc.stderr
    return out


def test_sidecar_images(images: Path, tmp_path: Path) -> None:
    made = sorted(p.name for p in images.glob("*.oci.tar"))
    assert made == [f"{p}.oci.tar" for p in sorted(SIDECARS[:3])]
    refs = {p.stem: p.read_text().strip() for p in images.glob("*.ref")}
    assert refs == {
        "csi-provisioner": "registry.local/sig-storage/csi-provisioner:v9.9.9",  # versions file
        "csi-resizer": "registry.local/sig-storage/csi-resizer:v2.2.0",  # build.sh's default
        "csi-snapshotter": "registry.local/sig-storage/csi-snapshotter:v8.6.0",
    }
    for prog in SIDECARS[:3]:
        config, files = image_files(images / f"{prog}.oci.tar")
        assert config["config"]["Entrypoint"] == [f"/{prog}"]  # type: ignore[index]
        assert files[prog] == DUMMY.read_bytes()
    if os.geteuid() == 0:  # the binary runs from the image's root filesystem
        root = tmp_path / "rootfs"
        _, files = image_files(images / "csi-provisioner.oci.tar")
        root.mkdir()
        (root / "csi-provisioner").write_bytes(files["csi-provisioner"])
        (root / "csi-provisioner").chmod(0o755)
        out = subprocess.run(["chroot", str(root), "/csi-provisioner", "--version"],
                             check=True, capture_output=True, text=True)  # fmt: skip
        assert "catatonit" in out.stdout + out.stderr
    if os.geteuid() == 0 and node_bin("containerd") and node_bin("ctr"):
        names = ctr_import(sorted(images.glob("*.oci.tar")), tmp_path / "ctd")
        assert "registry.local/sig-storage/csi-resizer:v2.2.0" in names


def test_same_binary_same_digest(images: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    subprocess.run(
        [str(REPO / "tests/e2e/tools/build-images.sh"), "--bin", str(tmp_path / "bin"),
         "--out", str(again), "--no-standins"],
        check=True, capture_output=True,
    )  # fmt: skip
    for p in images.glob("*.oci.tar"):
        assert (again / p.name).read_bytes() == p.read_bytes()
