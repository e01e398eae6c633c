"""Make container images without a container engine: reproducible layers, OCI layout + archive.

The one image maker of the project. `deploy/image/build.py` makes the Stowage image with it (a
Debian rootfs layer from mmdebstrap, a wheels layer, a Stowage layer); the e2e tools make the
pause, busybox, sidecar and stand-in images with its command line:

    python3 mkimage.py --ref registry.local/pause:3.10 --out pause.tar \\
        --static /usr/bin/catatonit:/catatonit --entrypoint /catatonit,-P
    python3 mkimage.py --ref registry.local/busybox:stowage --out busybox.tar \\
        --busybox /bin/busybox --cmd /bin/sh

Output is an OCI image layout (oci-layout, index.json, blobs/sha256/...), as a directory and/or
as a tar archive. The archive also carries a docker-save style manifest.json, so both
`ctr -n k8s.io images import FILE` (which names the image after the `io.containerd.image.name`
annotation) and `skopeo ... oci-archive:FILE` take it. Layers are tars written in sorted order
with owners and times normalised, so the same inputs give the same digests.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import io
import json
import os
import platform
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field

DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "var", "var/run")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
# pax headers worth keeping from an input tar (file capabilities, ACLs); times and names are not
KEEP_PAX_PREFIX = "SCHILY.xattr."

Entry = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = link
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def iso(epoch: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Layer:
    """The files of one layer, keyed by path without a leading slash; written sorted."""

    epoch: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)

    def _stamp(self, ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.mtime = self.epoch
        return ti

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.entries:
                m = 0o1777 if d == "tmp" else mode
                self.entries[d] = (self._stamp(_info(d, tarfile.DIRTYPE, m)), None)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = path.strip("/")
        self.add_dir(os.path.dirname(name))
        ti = self._stamp(_info(name, tarfile.REGTYPE, mode, len(data)))
        self.entries[name] = (ti, data)

    def add_symlink(self, path: str, target: str) -> None:
        name = path.strip("/")
        self.add_dir(os.path.dirname(name))
        self.entries[name] = (self._stamp(_info(name, tarfile.SYMTYPE, 0o777, link=target)), None)

    def add_tree(self, src: str, dest: str) -> None:
        """Every file under SRC at DEST: mode 0755 if executable else 0644, owner root."""
        self.add_dir(dest)
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(root, src)
            base = dest.strip("/") if rel == "." else f"{dest.strip('/')}/{rel}"
            self.add_dir(base)
            for name in sorted(files):
                full = os.path.join(root, name)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(f"{base}/{name}", os.readlink(full))
                    continue
                with open(full, "rb") as fh:
                    data = fh.read()
                self.add_file(f"{base}/{name}", data, 0o755 if st.st_mode & 0o111 else 0o644)

    def add_rootfs_tar(self, path: str, drop: Callable[[str], bool]) -> None:
        """Take a root filesystem tar (mmdebstrap's), keeping owners and modes, clamping
        times to the epoch, dropping device nodes and every path DROP accepts."""
        with tarfile.open(path) as tar:
            for ti in tar:
                name = ti.name.removeprefix("./").rstrip("/")
                if name in ("", ".") or drop(name):
                    continue
                if ti.ischr() or ti.isblk() or ti.isfifo():
                    continue
                new = copy.copy(ti)
                new.name = name
                new.mtime = min(int(ti.mtime), self.epoch)
                new.uname = new.gname = ""
                new.pax_headers = {
                    k: v for k, v in ti.pax_headers.items() if k.startswith(KEEP_PAX_PREFIX)
                }
                data: bytes | None = None
                if ti.isreg():
                    fh = tar.extractfile(ti)
                    assert fh is not None
                    data = fh.read()
                elif ti.islnk():
                    new.linkname = ti.linkname.removeprefix("./")
                self.entries[name] = (new, data)

    def _fix_hardlinks(self) -> dict[str, Entry]:
        """Sorted order may put a hard link before its target: make the first name of each
        link group the regular file and the others links to it."""
        entries = dict(self.entries)
        groups: dict[str, list[str]] = {}
        for name, (ti, _) in entries.items():
            if ti.islnk():
                groups.setdefault(ti.linkname, []).append(name)
        for target, links in groups.items():
            if target not in entries:
                raise ValueError(f"hard link to a missing file: {links[0]} -> {target}")
            names = sorted([target, *links])
            first = names[0]
            ti, data = entries[target]
            head = copy.copy(ti)
            head.name = first
            entries[first] = (head, data)
            for other in names[1:]:
                link = copy.copy(ti)
                link.name = other
                link.type = tarfile.LNKTYPE
                link.linkname = first
                link.size = 0
                entries[other] = (link, None)
        return entries

    def tar(self) -> bytes:
        entries = self._fix_hardlinks()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(entries):
                ti, data = entries[name]
                tar.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def layer(files: list[tuple[str, str]], busybox: str | None) -> bytes:
    """The base layer of the small test images: DIRS, /etc/passwd and /etc/group, each
    (source, destination) file at mode 0755, busybox and its applet links."""
    lay = Layer()
    for d in DIRS:
        lay.add_dir(d)
    lay.add_file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    lay.add_file("etc/group", b"root:x:0:\n")
    if busybox:
        files = [*files, (busybox, "/bin/busybox")]
    for src, dst in files:
        with open(src, "rb") as fh:
            lay.add_file(dst, fh.read(), 0o755)
    if busybox:
        applets = subprocess.run(
            [busybox, "--list-full"], check=True, capture_output=True, text=True
        )
        for path in applets.stdout.split():
            name = path.strip("/")
            if name in lay.entries or name == "bin/busybox":
                continue
            lay.add_symlink(name, "/bin/busybox")
        for d in ("bin", "usr/bin", "sbin", "usr/sbin"):
            lay.add_dir(d)
    return lay.tar()


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    ref: str  # name:tag, the name containerd gives the image on import
    layers: list[bytes]  # uncompressed layer tars, lowest first
    config: dict[str, object]  # the runtime config: Entrypoint, Cmd, User, Env, Labels...
    epoch: int = 0
    gzip: bool = False
    history: list[str] = field(default_factory=list)  # created_by, one per layer
    # where compressed layers are kept by their uncompressed digest (gzip is the slow part)
    gzip_cache: str | None = None
    _blobs: tuple[dict[str, bytes], str, int] | None = None

    def _compress(self, data: bytes) -> bytes:
        if not self.gzip_cache:
            return gzip.compress(data, compresslevel=6, mtime=0)
        path = os.path.join(self.gzip_cache, sha(data).split(":")[1] + ".tar.gz")
        if os.path.exists(path):
            with open(path, "rb") as fh:
                return fh.read()
        blob = gzip.compress(data, compresslevel=6, mtime=0)
        os.makedirs(self.gzip_cache, exist_ok=True)
        with open(path + ".part", "wb") as fh:
            fh.write(blob)
        os.replace(path + ".part", path)
        return blob

    def blobs(self) -> tuple[dict[str, bytes], str, int]:
        """Every blob by digest, and the manifest's digest and size."""
        if self._blobs is None:
            self._blobs = self._make_blobs()
        return self._blobs

    def _make_blobs(self) -> tuple[dict[str, bytes], str, int]:
        out: dict[str, bytes] = {}
        descriptors = []
        for data in self.layers:
            blob = self._compress(data) if self.gzip else data
            out[sha(blob)] = blob
            media = MEDIA_LAYER + ("+gzip" if self.gzip else "")
            descriptors.append({"mediaType": media, "digest": sha(blob), "size": len(blob)})
        created = iso(self.epoch)
        notes = self.history or ["stowage mkimage.py"] * len(self.layers)
        config = {
            "architecture": ARCH,
            "os": "linux",
            "created": created,
            "config": {"Env": [PATH_ENV], "WorkingDir": "/", **self.config},
            "rootfs": {"type": "layers", "diff_ids": [sha(d) for d in self.layers]},
            "history": [{"created": created, "created_by": n} for n in notes],
        }
        cdata = dumps(config)
        out[sha(cdata)] = cdata
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": sha(cdata), "size": len(cdata)},
            "layers": descriptors,
        }
        mdata = dumps(manifest)
        out[sha(mdata)] = mdata
        return out, sha(mdata), len(mdata)

    def files(self) -> list[tuple[str, bytes]]:
        """The OCI layout's files (path, content) in the order they are written."""
        repo, _, tag = self.ref.rpartition(":")
        if not repo or "/" in tag:
            raise ValueError(f"the image reference needs a tag: {self.ref}")
        blobs, mdig, msize = self.blobs()
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": mdig,
                    "size": msize,
                    "platform": {"architecture": ARCH, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": self.ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
        manifest = json.loads(blobs[mdig])
        docker_manifest = [
            {
                "Config": "blobs/sha256/" + manifest["config"]["digest"].split(":")[1],
                "RepoTags": [self.ref],
                "Layers": ["blobs/sha256/" + d["digest"].split(":")[1] for d in manifest["layers"]],
            }
        ]
        out = [(f"blobs/sha256/{d.split(':')[1]}", blobs[d]) for d in sorted(blobs)]
        out += [
            ("oci-layout", dumps({"imageLayoutVersion": "1.0.0"})),
            ("index.json", dumps(index)),
            ("manifest.json", dumps(docker_manifest)),
        ]
        return out

    def digest(self) -> str:
        return self.blobs()[1]

    def write_archive(self, out: str) -> str:
        tmp = out + ".part"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for d in ("blobs", "blobs/sha256"):
                tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))
            for name, data in self.files():
                ti = _info(name, tarfile.REGTYPE, 0o644, len(data))
                tar.addfile(ti, io.BytesIO(data))
        os.replace(tmp, out)
        return self.digest()

    def write_layout(self, out: str) -> str:
        """An OCI layout directory (umoci unpack --image OUT:TAG, skopeo oci:OUT)."""
        os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
        for name, data in self.files():
            path = os.path.join(out, name)
            if name.startswith("blobs/") and os.path.exists(path):
                continue
            with open(path + ".part", "wb") as fh:
                fh.write(data)
            os.replace(path + ".part", path)
        return self.digest()


def build(
    ref: str,
    out: str,
    files: list[tuple[str, str]],
    busybox: str | None,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
) -> None:
    """The small one-layer test images (pause, busybox, a sidecar binary)."""
    config: dict[str, object] = {
        **({"Entrypoint": entrypoint} if entrypoint else {}),
        **({"Cmd": cmd} if cmd else {}),
    }
    image = Image(ref, [layer(files, busybox)], config)
    try:
        digest = image.write_archive(out)
    except ValueError as exc:
        sys.exit(f"mkimage: {exc}")
    print(f"mkimage: {ref} manifest {digest} layer {len(image.layers[0])} bytes -> {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--ref", required=True, help="image name with tag, e.g. registry.local/pause:3.10"
    )
    ap.add_argument("--out", required=True, help="tarball to write")
    ap.add_argument(
        "--static",
        action="append",
        default=[],
        metavar="SRC:DEST",
        help="copy the (static) file SRC into the image at DEST, mode 0755",
    )
    ap.add_argument("--busybox", help="a static busybox: /bin/busybox plus a symlink per applet")
    ap.add_argument("--entrypoint", help="comma-separated entrypoint")
    ap.add_argument("--cmd", help="comma-separated command")
    a = ap.parse_args(argv)
    files = []
    for spec in a.static:
        src, _, dst = spec.partition(":")
        if not dst:
            ap.error(f"--static needs SRC:DEST: {spec}")
        files.append((src, dst))

    def split(s: str | None) -> list[str] | None:
        return s.split(",") if s else None

    build(a.ref, a.out, files, a.busybox, split(a.entrypoint), split(a.cmd))


if __name__ == "__main__":
    main()
