"""deploy/Dockerfile and the engine-less build (deploy/image/build.py) describe one image:
the same package list, Python dependencies, paths, user, entrypoint, environment and labels."""

from __future__ import annotations

import re
import shlex
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.chart import test_dockerfile as df

from .util import IMAGE_DIR, REPO, load

build = load("build")


def runtime() -> list[tuple[str, str]]:
    return dict(df.stages())["runtime"]


def build_stage() -> list[tuple[str, str]]:
    return dict(df.stages())["build"]


def test_one_package_list_feeds_both() -> None:
    body = runtime()
    copies = [a for i, a in body if i == "COPY"]
    assert "deploy/image/packages.txt /tmp/packages.txt" in copies
    apt = next(a for i, a in body if i == "RUN" and "apt-get install" in a)
    assert "$(sed -e 's/#.*//' /tmp/packages.txt)" in apt, apt
    # the Dockerfile names no package of its own in the runtime stage
    words = apt.split("apt-get install", 1)[1].split("&&")[0].split()
    assert [w for w in words if not w.startswith(("-", "$(", "'", "/tmp"))] == [], words
    names = build.packages()
    assert names == ["python3", "e2fsprogs", "xfsprogs", "btrfs-progs", "util-linux", "mount"]
    pinned = {n for n, _, _ in build.DebianLock.read().pins}
    assert set(names) <= pinned, set(names) - pinned  # the lock covers the list


def test_the_tools_the_driver_runs_are_in_the_listed_packages() -> None:
    """Every program driver/ execs through its runner, and the package that ships it."""
    ships = {
        "mkfs.ext4": "e2fsprogs", "e2fsck": "e2fsprogs", "dumpe2fs": "e2fsprogs",
        "resize2fs": "e2fsprogs", "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs",
        "mkfs.btrfs": "btrfs-progs", "btrfs": "btrfs-progs", "blkid": "util-linux",
        "losetup": "mount", "mount": "mount", "umount": "mount",
    }  # fmt: skip
    execd: set[str] = set()
    for path in (REPO / "driver").rglob("*.py"):
        text = path.read_text()
        for argv in re.findall(r"\[\s*\"([a-z0-9_.]+)\",", text):
            if re.search(rf"(run|MKFS|argv)\W[^\n]*\[\s*\"{re.escape(argv)}\"", text) or (
                argv.startswith("mkfs.")
            ):
                execd.add(argv)
    assert execd, "found no argv lists in driver/"
    unknown = execd - set(ships)
    assert not unknown, f"driver/ runs {unknown}: add its package to packages.txt and here"
    assert {ships[c] for c in execd} <= set(build.packages())


def test_python_dependencies_agree() -> None:
    b = build_stage()
    pip = next(a for i, a in b if i == "RUN" and "requirements.lock" in a)
    assert "--require-hashes" in pip and "-r deploy/image/requirements.lock" in pip
    assert "--target /site/deps" in pip
    copies = [a for i, a in b if i == "COPY"]
    assert "deploy/image/requirements.lock ./deploy/image/" in copies
    # every runtime dependency of pyproject is locked at a version it accepts, with a hash
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    locked: dict[str, str] = {}
    for line in (IMAGE_DIR / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            spec, _, hashes = line.partition(" --hash=sha256:")
            name, _, ver = spec.partition("==")
            assert re.fullmatch(r"[0-9a-f]{64}", hashes), line
            locked[canonicalize_name(name)] = ver
    for dep in pyproject["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in locked, f"{dep} is not in requirements.lock: run make image-lock"
        assert req.specifier.contains(locked[name]), f"{dep} vs locked {locked[name]}"


def test_paths_agree() -> None:
    copies = [shlex.split(a) for i, a in runtime() if i == "COPY" and a.startswith("--from=")]
    dests = {c[-1].strip("/") for c in copies}
    assert dests == {build.SITE, build.BIN}, dests
    assert build.SITE == "usr/local/lib/python3.11/dist-packages"
    assert build.PYTHON == "/usr/bin/python3"  # Debian's, the packages.txt python3


def test_config_agrees() -> None:
    body = runtime()
    config = build.image_config("REV")
    entry = [a for i, a in body if i == "ENTRYPOINT"]
    cmd = [a for i, a in body if i == "CMD"]
    user = [a for i, a in body if i == "USER"]
    assert entry == [f'["{config["Entrypoint"][0]}"]'] and len(config["Entrypoint"]) == 1
    assert cmd == [f'["{config["Cmd"][0]}"]'] and len(config["Cmd"]) == 1
    assert user == [config["User"]] == ["65532:65532"]
    env = " ".join(a for i, a in body if i == "ENV")
    assert sorted(re.findall(r"(\w+=\S+)", env)) == sorted(
        e for e in config["Env"] if not e.startswith("PATH=")
    )
    # the user: useradd there, passwd/group lines here, same ids and name
    run = " ".join(a for i, a in body if i == "RUN")
    assert "--gid 65532 nonroot" in run and "--uid 65532 --gid 65532" in run


def test_labels_agree() -> None:
    body = runtime()
    text = " ".join(a for i, a in body if i == "LABEL")
    labels = dict(re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=\"([^\"]*)\"", text))
    args = dict(a.split("=", 1) for i, a in body if i == "ARG" and "=" in a)
    ours = build.labels("REV")
    assert set(labels) == set(ours)
    for key, value in labels.items():
        if key.endswith(".base.name"):  # debian:bookworm-slim vs the mmdebstrap of bookworm
            assert value == "${BASE_IMAGE}" and ours[key].startswith(f"debian:{build.SUITE}")
        elif key.endswith(".revision"):
            assert value == "${REVISION}"
        elif key.endswith(".version"):
            assert value == "${VERSION}" and args["VERSION"] == ours[key]
        else:
            assert value == ours[key], key
    base = dict(a.split("=", 1) for i, a in df.instructions() if i == "ARG" and "=" in a)
    assert base["BASE_IMAGE"].startswith(f"debian:{build.SUITE}"), base


def test_the_wheel_is_made_of_the_same_files() -> None:
    copies = [shlex.split(a) for i, a in build_stage() if i == "COPY"]
    sources = {s.rstrip("/") for c in copies for s in c[:-1]} - {"deploy/image/requirements.lock"}
    assert sources == set(build.WHEEL_SOURCES)
