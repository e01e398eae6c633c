"""The image maker: deterministic layers, hard links in sorted order, a valid OCI layout."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .util import load

mkimage = load("mkimage")


def rootfs_tar(path: Path, mtime: int) -> None:
    with tarfile.open(path, "w") as tar:
        for name, kind in (("./", tarfile.DIRTYPE), ("./usr/", tarfile.DIRTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = kind, 0o755, mtime
            tar.addfile(ti)
        data = b"python"
        ti = tarfile.TarInfo("./usr/zz-python3.11")  # sorts after its hard link below
        ti.size, ti.mode, ti.mtime, ti.uid = len(data), 0o755, mtime, 0
        tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("./usr/aa-python3")
        link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "./usr/zz-python3.11", mtime
        tar.addfile(link)
        dev = tarfile.TarInfo("./dev-null")
        dev.type = tarfile.CHRTYPE
        tar.addfile(dev)
        log = tarfile.TarInfo("./var/log/apt.log")
        log.size = 1
        tar.addfile(log, io.BytesIO(b"x"))


def test_rootfs_layer_is_sorted_clamped_and_links_resolve(tmp_path: Path) -> None:
    src = tmp_path / "rootfs.tar"
    rootfs_tar(src, mtime=2_000_000_000)
    layer = mkimage.Layer(epoch=1_000)
    layer.add_rootfs_tar(str(src), lambda n: n.startswith("var/log/"))
    data = layer.tar()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names) == ["usr", "usr/aa-python3", "usr/zz-python3.11"]
        assert {m.mtime for m in members} == {1_000}
        first, second = members[1], members[2]
        assert first.isreg() and second.islnk() and second.linkname == "usr/aa-python3"
        fh = tar.extractfile(first)
        assert fh is not None and fh.read() == b"python"
    # the same input twice, and a different file time in the input: the same bytes
    rootfs_tar(src, mtime=2_100_000_000)
    again = mkimage.Layer(epoch=1_000)
    again.add_rootfs_tar(str(src), lambda n: n.startswith("var/log/"))
    assert again.tar() == data


def test_tree_modes_and_owner(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    script = tmp_path / "pkg" / "run"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    layer = mkimage.Layer(epoch=5)
    layer.add_tree(str(tmp_path / "pkg"), "/usr/local/lib/x")
    with tarfile.open(fileobj=io.BytesIO(layer.tar())) as tar:
        modes = {m.name: (m.mode, m.uid, m.gid, m.mtime) for m in tar}
    assert modes["usr/local/lib/x/mod.py"] == (0o644, 0, 0, 5)
    assert modes["usr/local/lib/x/run"] == (0o755, 0, 0, 5)


def image(gzip: bool) -> object:
    lay = mkimage.Layer(epoch=10)
    lay.add_file("etc/hello", b"hi\n")
    return mkimage.Image(
        "registry.local/t/hello:v1", [lay.tar()], {"Entrypoint": ["/x"]}, epoch=10, gzip=gzip
    )


@pytest.mark.parametrize("gzip", [False, True])
def test_archive_is_an_oci_layout_and_reproducible(tmp_path: Path, gzip: bool) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    image(gzip).write_archive(str(a))  # type: ignore[attr-defined]
    image(gzip).write_archive(str(b))  # type: ignore[attr-defined]
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{manifest_digest}"))  # type: ignore[arg-type]
        layer_media = manifest["layers"][0]["mediaType"]
        assert layer_media.endswith("+gzip") == gzip
        ann = index["manifests"][0]["annotations"]
        assert ann["io.containerd.image.name"] == "registry.local/t/hello:v1"
        assert ann["org.opencontainers.image.ref.name"] == "v1"
        assert "manifest.json" in tar.getnames()  # docker-save style, for ctr import
    if shutil.which("skopeo"):
        out = subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{a}"], check=True, capture_output=True, text=True
        )
        info = json.loads(out.stdout)
        assert info["Digest"] == "sha256:" + manifest_digest
        assert info["Created"] == "1970-01-01T00:00:10Z"
