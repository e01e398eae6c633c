"""Build the Stowage container image without a container engine (`make image`).

Three layers, lowest first:
  1. Debian: mmdebstrap of the packages in packages.txt at the versions in debian.lock
     (variant essential, no recommends, no docs/man/locales), plus the non-root user 65532;
  2. wheels: Stowage's Python dependencies from PyPI at the versions and hashes in
     requirements.lock, installed into /usr/local/lib/python3.11/dist-packages (Debian's
     python3 finds it; Debian's own python3-grpcio/protobuf are too old for the stubs);
  3. stowage: the wheel built from this checkout's tracked files, and its console scripts.
Written with mkimage.py as an OCI layout directory and an OCI archive. Every time is
SOURCE_DATE_EPOCH from debian.lock and every tar is sorted, so the same lock and the same
checkout give the same digest.

    python3 deploy/image/build.py build [--out .image] [--cache ~/.cache/stowage/image]
    python3 deploy/image/build.py lock     # re-resolve both lock files from the mirrors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkimage

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACKAGES = HERE / "packages.txt"
DEBIAN_LOCK = HERE / "debian.lock"
REQUIREMENTS_LOCK = HERE / "requirements.lock"

SUITE = "bookworm"
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
SITE = "usr/local/lib/python3.11/dist-packages"
BIN = "usr/local/bin"
PYTHON = "/usr/bin/python3"
UID = GID = 65532
# The wheels' target: Debian bookworm's CPython 3.11 on glibc 2.36.
WHEEL_TARGET = (
    "--only-binary=:all:",
    "--implementation=cp",
    "--python-version=3.11",
    "--abi=cp311",
    "--platform=manylinux_2_28_x86_64",
    "--platform=manylinux_2_17_x86_64",
    "--platform=manylinux2014_x86_64",
)
MMDEBSTRAP = (
    "--variant=essential",
    "--mode=root",
    "--format=tar",
    # merged /usr from the start (symlinks + usr-is-merged), so apt never pulls in usrmerge
    # and with it perl
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    '--aptopt=APT::Install-Recommends "false"',
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
# Left out of the Debian layer: apt's caches and lists, logs, dpkg/debconf backups, temp files.
DROP = re.compile(
    r"(var/cache/apt|var/lib/apt/lists|var/log|tmp|var/tmp)/.+"
    r"|var/cache/ldconfig/aux-cache|var/cache/debconf/.+-old|var/lib/dpkg/[^/]+-old"
    r"|dev/.+"
)
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
)
ENTRYPOINT = ("stowage-csi",)
CMD = ("--help",)
USER = f"{UID}:{GID}"
CACHE = Path(os.environ.get("STOWAGE_IMAGE_CACHE", Path.home() / ".cache/stowage/image"))
# Part of every cache key: a change to how layers are made is a change of input.
RECIPE = hashlib.sha256(
    (HERE / "build.py").read_bytes() + (HERE / "mkimage.py").read_bytes()
).hexdigest()
BASE_NAME = f"debian:{SUITE} (mmdebstrap, deploy/image/debian.lock)"


def log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def version() -> str:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return str(project["version"])


def packages() -> list[str]:
    """packages.txt: one name a line, # comments."""
    out = []
    for line in PACKAGES.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            out.append(name)
    return out


def labels(revision: str) -> dict[str, str]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return {
        "org.opencontainers.image.title": "stowage-csi",
        "org.opencontainers.image.description": str(project["description"]),
        "org.opencontainers.image.version": str(project["version"]),
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.licenses": str(project["license"]),
        "org.opencontainers.image.source": "https://github.com/stowage/stowage",
        "org.opencontainers.image.base.name": BASE_NAME,
    }


def image_config(revision: str) -> dict[str, object]:
    return {
        "Entrypoint": list(ENTRYPOINT),
        "Cmd": list(CMD),
        "User": USER,
        "Env": list(ENV),
        "WorkingDir": "/",
        "Labels": labels(revision),
    }


# --- debian.lock ------------------------------------------------------------------------------


class DebianLock:
    def __init__(self, epoch: int, sources: list[str], pins: list[tuple[str, str, str]]) -> None:
        self.epoch = epoch
        self.sources = sources
        self.pins = pins  # (package, version, architecture), sorted

    @classmethod
    def read(cls, path: Path = DEBIAN_LOCK) -> DebianLock:
        epoch, sources, pins = 0, [], []
        for line in path.read_text().splitlines():
            word, _, rest = line.partition(" ")
            if word == "epoch":
                epoch = int(rest)
            elif word == "source":
                sources.append(rest)
            elif word == "package":
                name, ver, arch = rest.split()
                pins.append((name, ver, arch))
        if not epoch or not sources or not pins:
            raise SystemExit(f"{path}: needs epoch, source and package lines")
        return cls(epoch, sources, sorted(pins))

    def text(self) -> str:
        head = [
            "# The Debian layer of the Stowage image: every package in it at its version, as",
            "# resolved from the mirrors by `make image-lock`. `make image` installs exactly these",
            "# and fails when a mirror no longer serves one (refresh with `make image-lock`).",
            "# epoch: SOURCE_DATE_EPOCH of every layer (times, image creation date).",
            f"epoch {self.epoch}",
            f"suite {SUITE}",
        ]
        body = [f"source {s}" for s in self.sources]
        body += [f"package {n} {v} {a}" for n, v, a in self.pins]
        return "\n".join(head + body) + "\n"


def dpkg_status(rootfs_tar: str) -> list[tuple[str, str, str]]:
    """(package, version, architecture) of every installed package in a rootfs tar."""
    import tarfile

    with tarfile.open(rootfs_tar) as tar:
        fh = tar.extractfile("./var/lib/dpkg/status")
        assert fh is not None
        text = fh.read().decode()
    pins = []
    for para in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in para.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status") == "install ok installed":
            pins.append((fields["Package"], fields["Version"], fields["Architecture"]))
    return sorted(pins)


def mmdebstrap(out: str, includes: list[str], sources: list[str], epoch: int) -> None:
    argv = ["mmdebstrap", *MMDEBSTRAP, "--include=" + ",".join(includes), SUITE, out, *sources]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    proc = subprocess.run(argv, env=env, text=True, capture_output=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(
            "image: mmdebstrap failed (a pinned version gone from the mirror? "
            "run `make image-lock`)"
        )


def base_layer(lock: DebianLock, cache: Path) -> bytes:
    """The Debian layer, cached by the lock, the package list and this recipe."""
    key = hashlib.sha256(
        "\n".join([lock.text(), PACKAGES.read_text(), *MMDEBSTRAP, DROP.pattern, RECIPE]).encode()
    ).hexdigest()[:16]
    cached = cache / f"debian-{key}.tar"
    if cached.exists():
        log(f"Debian layer cached ({cached})")
        return cached.read_bytes()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stowage-image-") as tmp:
        rootfs = os.path.join(tmp, "rootfs.tar")
        log(f"mmdebstrap {SUITE}: {len(lock.pins)} pinned packages")
        mmdebstrap(rootfs, [f"{n}={v}" for n, v, _ in lock.pins], lock.sources, lock.epoch)
        got = dpkg_status(rootfs)
        if got != lock.pins:
            extra = sorted(set(got) - set(lock.pins))
            missing = sorted(set(lock.pins) - set(got))
            raise SystemExit(f"image: rootfs differs from debian.lock: +{extra} -{missing}")
        layer = mkimage.Layer(epoch=lock.epoch)
        layer.add_rootfs_tar(rootfs, lambda name: bool(DROP.fullmatch(name)))
    add_user(layer)
    data = layer.tar()
    cache.mkdir(parents=True, exist_ok=True)
    tmpfile = cached.with_suffix(".part")
    tmpfile.write_bytes(data)
    tmpfile.replace(cached)
    log(f"Debian layer built in {time.monotonic() - started:.0f}s")
    return data


def add_user(layer: mkimage.Layer) -> None:
    """The image's non-root user and group, 65532 `nonroot` (the Dockerfile's useradd)."""
    for path, line in (
        ("etc/passwd", f"nonroot:x:{UID}:{GID}:nonroot:/nonexistent:/usr/sbin/nologin\n"),
        ("etc/group", f"nonroot:x:{GID}:\n"),
    ):
        ti, data = layer.entries[path]
        assert data is not None
        new = data + line.encode()
        ti.size = len(new)
        layer.entries[path] = (ti, new)


# --- Python layers ----------------------------------------------------------------------------


def pip(*args: str) -> None:
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args])


WHEEL_SOURCES = ("pyproject.toml", "README.md", "csi_proto", "driver")  # the Dockerfile's COPYs


def tracked_source(dest: Path) -> None:
    """The files the wheel is made of, as tracked by git (with their working-tree content)."""
    out = run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--", *WHEEL_SOURCES], capture_output=True
    ).stdout
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if not src.exists():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)


def python_layer(site: Path, epoch: int) -> bytes:
    """SITE's packages under /usr/local/lib/python3.11/dist-packages and its console scripts
    under /usr/local/bin, started by Debian's /usr/bin/python3."""
    layer = mkimage.Layer(epoch=epoch)
    scripts = site / "bin"
    for path in sorted(scripts.iterdir()) if scripts.exists() else []:
        data = path.read_bytes()
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            data = f"#!{PYTHON}".encode() + b"\n" + data.split(b"\n", 1)[1]
        layer.add_file(f"{BIN}/{path.name}", data, 0o755)
    if scripts.exists():
        shutil.rmtree(scripts)
    for junk in site.glob("*.dist-info/direct_url.json"):
        junk.unlink()
    layer.add_tree(str(site), SITE)
    return layer.tar()


def wheels(cache: Path) -> Path:
    """Download (or find in the cache) exactly the wheels of requirements.lock."""
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    pip(
        "download",
        "--no-deps",
        "--require-hashes",
        *WHEEL_TARGET,
        "--dest",
        str(dest),
        "-r",
        str(REQUIREMENTS_LOCK),
    )
    return dest


def revision() -> str:
    """HEAD, with -dirty when a file the wheel is made of differs from it."""
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        return "unknown"
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", *WHEEL_SOURCES],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return proc.stdout.strip() + ("-dirty" if changed.strip() else "")


def deps_layer(cache: Path, epoch: int) -> bytes:
    """The wheels of requirements.lock installed under /usr/local/lib/python3.11, cached by
    the lock, the epoch and this recipe."""
    key = hashlib.sha256(
        "\n".join([REQUIREMENTS_LOCK.read_text(), str(epoch), SITE, BIN, PYTHON, RECIPE]).encode()
    ).hexdigest()[:16]
    cached = cache / f"wheels-{key}.tar"
    if cached.exists():
        log(f"wheels layer cached ({cached})")
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="stowage-image-") as tmp:
        found = wheels(cache)
        pip(
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--require-hashes",
            "--only-binary=:all:",
            "--find-links",
            str(found),
            "--target",
            f"{tmp}/deps",
            "-r",
            str(REQUIREMENTS_LOCK),
        )
        data = python_layer(Path(tmp) / "deps", epoch)
    cache.mkdir(parents=True, exist_ok=True)
    part = cached.with_suffix(".part")
    part.write_bytes(data)
    part.replace(cached)
    return data


def app_layer(epoch: int) -> bytes:
    """Stowage's wheel, built from the checkout's tracked files, installed like the wheels."""
    with tempfile.TemporaryDirectory(prefix="stowage-image-") as tmp_name:
        tmp = Path(tmp_name)
        tracked_source(tmp / "src")
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "--disable-pip-version-check",
                "-q",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(tmp / "wheel"),
                str(tmp / "src"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        pip(
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--find-links",
            str(tmp / "wheel"),
            "--target",
            str(tmp / "app"),
            f"stowage-csi=={version()}",
        )
        return python_layer(tmp / "app", epoch)


def write(image: mkimage.Image, out: Path, name: str, layout: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if layout:
        path = out / "oci"
        if path.exists():
            shutil.rmtree(path)
        image.write_layout(str(path))
    archive = out / f"{name}.oci.tar"
    digest = image.write_archive(str(archive))
    (out / f"{name}.digest").write_text(digest + "\n")
    return archive


def build(out: Path, cache: Path, ref: str, gzip: bool) -> str:
    started = time.monotonic()
    lock = DebianLock.read()
    image = mkimage.Image(
        ref=ref,
        layers=[base_layer(lock, cache), deps_layer(cache, lock.epoch), app_layer(lock.epoch)],
        config=image_config(revision()),
        epoch=lock.epoch,
        gzip=gzip,
        gzip_cache=str(cache / "gzip"),
        history=[
            f"mmdebstrap {SUITE}: deploy/image/packages.txt at deploy/image/debian.lock",
            "pip install --target: deploy/image/requirements.lock",
            f"pip install --target: stowage-csi {version()} from the checkout",
        ],
    )
    archive = write(image, out, f"stowage-csi-{version()}", layout=True)
    digest = image.digest()
    sizes = [len(x) for x in image.layers]
    log(
        f"{ref} {digest}: layers {' + '.join(f'{s / 2**20:.1f}' for s in sizes)} MiB "
        f"(uncompressed), archive {archive.stat().st_size / 2**20:.1f} MiB, "
        f"{time.monotonic() - started:.0f}s"
    )
    log(f"OCI archive {archive}; OCI layout {out / 'oci'} (tag {version()})")
    print(digest)
    return digest


# The stand-ins for the two sidecars the module proxy refuses, as test images: the Stowage
# image's Debian and wheels layers (they need Python and grpcio; on a node that has the Stowage
# image these layers are already there, so each stand-in adds a few KiB) and one layer with the
# stand-in script at the path the upstream image has its binary.
STANDINS = {
    "csi-node-driver-registrar": ("registrar.py", "v2.17.0"),
    "livenessprobe": ("livenessprobe.py", "v2.19.0"),
}
STANDIN_REPO = "registry.local/stowage-e2e"


def standins(out: Path, cache: Path) -> None:
    lock = DebianLock.read()
    base, deps = base_layer(lock, cache), deps_layer(cache, lock.epoch)
    for prog, (script, tag) in STANDINS.items():
        layer = mkimage.Layer(epoch=lock.epoch)
        layer.add_file(
            f"opt/stowage-standin/{script}", (REPO / "tests" / "e2e" / script).read_bytes()
        )
        layer.add_file(
            prog,
            (
                f"#!{PYTHON}\n"
                f"# Stowage e2e stand-in for the {prog} sidecar (not the upstream one)\n"
                "import sys\n"
                "sys.path.insert(0, '/opt/stowage-standin')\n"
                f"from {script[:-3]} import main\n"
                "sys.exit(main())\n"
            ).encode(),
            0o755,
        )
        ref = f"{STANDIN_REPO}/{prog}-standin:{tag}"
        image = mkimage.Image(
            gzip=True,
            gzip_cache=str(cache / "gzip"),
            ref=ref,
            layers=[base, deps, layer.tar()],
            epoch=lock.epoch,
            config={
                "Entrypoint": [f"/{prog}"],
                "Env": list(ENV),
                "Labels": {
                    "org.opencontainers.image.title": f"{prog}-standin",
                    "org.opencontainers.image.description": (
                        f"Stowage e2e test stand-in for {prog} (tests/e2e/{script})"
                    ),
                },
            },
            history=[
                "mmdebstrap: deploy/image/debian.lock",
                "pip install --target: deploy/image/requirements.lock",
                f"tests/e2e/{script}",
            ],
        )
        archive = write(image, out, f"{prog}-standin", layout=False)
        log(f"{ref} {image.digest()} -> {archive}")


# --- lock -------------------------------------------------------------------------------------


def lock() -> None:
    """Resolve packages.txt against the mirrors and pyproject's dependencies against PyPI."""
    epoch = int(time.time())
    with tempfile.TemporaryDirectory(prefix="stowage-image-lock-") as tmp:
        rootfs = os.path.join(tmp, "rootfs.tar")
        log(f"mmdebstrap {SUITE} (unpinned) to resolve {', '.join(packages())}")
        mmdebstrap(rootfs, packages(), list(SOURCES), epoch)
        pins = dpkg_status(rootfs)
        DEBIAN_LOCK.write_text(DebianLock(epoch, list(SOURCES), pins).text())
        log(f"{DEBIAN_LOCK.relative_to(REPO)}: {len(pins)} packages")
        project = pyproject()["project"]
        assert isinstance(project, dict)
        deps = [str(d) for d in project["dependencies"]]
        wheel_dir = Path(tmp) / "wheels"
        pip("download", *WHEEL_TARGET, "--dest", str(wheel_dir), *deps)
        lines = [
            "# Stowage's Python dependencies in the image: every wheel at its version and sha256,",
            "# resolved for CPython 3.11 manylinux x86_64 by `make image-lock`. `make image`",
            "# (deploy/image/build.py) and deploy/Dockerfile both install exactly these.",
        ]
        for whl in sorted(wheel_dir.glob("*.whl"), key=lambda p: p.name.lower()):
            name, ver = whl.name.split("-")[:2]
            digest = hashlib.sha256(whl.read_bytes()).hexdigest()
            lines.append(f"# {whl.name}")
            lines.append(f"{name.replace('_', '-').lower()}=={ver} --hash=sha256:{digest}")
        others = [p.name for p in wheel_dir.iterdir() if not p.name.endswith(".whl")]
        if others:
            raise SystemExit(f"image: not wheels: {others}")
        REQUIREMENTS_LOCK.write_text("\n".join(lines) + "\n")
        log(f"{REQUIREMENTS_LOCK.relative_to(REPO)}: {(len(lines) - 3) // 2} wheels")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the image from the lock files")
    b.add_argument("--out", type=Path, default=REPO / ".image")
    b.add_argument("--cache", type=Path, default=CACHE)
    b.add_argument(
        "--ref",
        default=f"docker.io/library/stowage-csi:{version()}",
        help="the name containerd gives the image on import",
    )
    b.add_argument("--no-gzip", action="store_true", help="uncompressed layers")
    st = sub.add_parser("standins", help="the registrar and livenessprobe stand-in images")
    st.add_argument("--out", type=Path, required=True)
    sub.add_parser("lock", help="re-resolve debian.lock and requirements.lock")
    sub.add_parser("config", help="print the image config (entrypoint, user, env, labels)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.out, a.cache, a.ref, gzip=not a.no_gzip)
    elif a.cmd == "standins":
        standins(a.out, CACHE)
    elif a.cmd == "lock":
        lock()
    else:
        print(json.dumps(image_config(revision()), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
