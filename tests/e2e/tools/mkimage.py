"""Make a one-layer container image tarball without a container engine.

The tarball is an OCI image layout (oci-layout, index.json, blobs/sha256/...) that also carries
a docker-save style manifest.json, so `ctr -n k8s.io images import FILE` takes it and names the
image after the `io.containerd.image.name` annotation. The layer is an uncompressed tar built
in a fixed order with zeroed times and owners, so the same inputs give the same digests.

    python3 mkimage.py --ref registry.local/pause:3.10 --out pause.tar \
        --static /usr/bin/catatonit:/catatonit --entrypoint /catatonit,-P
    python3 mkimage.py --ref registry.local/busybox:stowage --out busybox.tar \
        --busybox /bin/busybox --cmd /bin/sh
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile

DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "var", "var/run")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


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


def layer(files: list[tuple[str, str]], busybox: str | None) -> bytes:
    """Return the layer tar: DIRS, each (source, destination) file, busybox and its applet links."""
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in entries:
                mode = 0o1777 if d == "tmp" else 0o755
                entries[d] = (_info(d, tarfile.DIRTYPE, mode), None)

    for d in DIRS:
        add_dir(d)
    entries["etc/passwd"] = (
        _info("etc/passwd", tarfile.REGTYPE, 0o644),
        b"root:x:0:0:root:/:/bin/sh\n",
    )
    entries["etc/group"] = (_info("etc/group", tarfile.REGTYPE, 0o644), b"root:x:0:\n")
    if busybox:
        files = [*files, (busybox, "/bin/busybox")]
    for src, dst in files:
        with open(src, "rb") as fh:
            data = fh.read()
        name = dst.strip("/")
        add_dir(os.path.dirname(name))
        entries[name] = (_info(name, tarfile.REGTYPE, 0o755, len(data)), data)
    if busybox:
        applets = subprocess.run(
            [busybox, "--list-full"], check=True, capture_output=True, text=True
        )
        for path in applets.stdout.split():
            name = path.strip("/")
            if name in entries or name == "bin/busybox":
                continue
            add_dir(os.path.dirname(name))
            entries[name] = (_info(name, tarfile.SYMTYPE, 0o777, link="/bin/busybox"), None)
        for d in ("bin", "usr/bin", "sbin", "usr/sbin"):
            add_dir(d)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            ti, data = entries[name]
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    ti = _info(f"blobs/sha256/{digest}", tarfile.REGTYPE, 0o644, len(data))
    tar.addfile(ti, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def build(
    ref: str,
    out: str,
    files: list[tuple[str, str]],
    busybox: str | None,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
) -> None:
    layer_tar = layer(files, busybox)
    layer_digest = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config: dict[str, object] = {
        "architecture": ARCH,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
            **({"Entrypoint": entrypoint} if entrypoint else {}),
            **({"Cmd": cmd} if cmd else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "stowage mkimage.py"}],
    }
    repo, _, tag = ref.rpartition(":")
    if not repo or "/" in tag:
        sys.exit(f"mkimage: --ref needs a tag: {ref}")
    tmp = out + ".part"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))
        ldig, lsize = blob(tar, layer_tar)
        cdig, csize = blob(tar, dumps(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdig,
                "size": csize,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": ldig,
                    "size": lsize,
                }
            ],
        }
        mdig, msize = blob(tar, dumps(manifest))
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": mdig,
                    "size": msize,
                    "platform": {"architecture": ARCH, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
        docker_manifest = [
            {
                "Config": f"blobs/sha256/{cdig.split(':')[1]}",
                "RepoTags": [ref],
                "Layers": [f"blobs/sha256/{ldig.split(':')[1]}"],
            }
        ]
        for name, data in (
            ("oci-layout", dumps({"imageLayoutVersion": "1.0.0"})),
            ("index.json", dumps(index)),
            ("manifest.json", dumps(docker_manifest)),
        ):
            tar.addfile(_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    os.replace(tmp, out)
    print(f"mkimage: {ref} manifest {mdig} layer {lsize} bytes -> {out}")


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
    split = lambda s: s.split(",") if s else None  # noqa: E731
    build(a.ref, a.out, files, a.busybox, split(a.entrypoint), split(a.cmd))


if __name__ == "__main__":
    main()
