"""Load deploy/image's modules (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "deploy" / "image"


def load(name: str) -> ModuleType:
    if str(IMAGE_DIR) not in sys.path:
        sys.path.insert(0, str(IMAGE_DIR))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, IMAGE_DIR / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def node_bin(name: str) -> Path | None:
    """A program the e2e node tools cached (tests/e2e/tools/build-node.sh), or None."""
    found = sorted(Path.home().glob(f".cache/stowage/e2e/k8s-*/bin/{name}"))
    return found[-1] if found else None


def ctr_import(archives: list[Path], workdir: Path) -> list[str]:
    """Start a private containerd (cached by the node tools) in WORKDIR, `ctr images import`
    each archive into namespace k8s.io the way the node tier will, and return the image names
    it then lists. Stops that containerd and removes what it left."""
    import json
    import subprocess
    import time

    containerd, ctr = node_bin("containerd"), node_bin("ctr")
    assert containerd and ctr
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "ctd.sock"
    config = workdir / "config.toml"
    q = json.dumps
    config.write_text(
        f"""version = 3
root = {q(str(workdir / "root"))}
state = {q(str(workdir / "state"))}
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime",
  "io.containerd.cri.v1.images", "io.containerd.nri.v1.nri"]
[grpc]
  address = {q(str(sock))}
[ttrpc]
  address = {q(str(sock) + ".ttrpc")}
[metrics]
  address = ""
[plugins.'io.containerd.internal.v1.opt']
  path = {q(str(workdir / "opt"))}
"""
    )
    log = (workdir / "containerd.log").open("w")
    proc = subprocess.Popen([str(containerd), "--config", str(config)], stdout=log, stderr=log)
    try:
        base = [str(ctr), "--address", str(sock), "-n", "k8s.io"]
        deadline = time.monotonic() + 30
        while subprocess.run([*base, "version"], capture_output=True).returncode:
            assert proc.poll() is None, (workdir / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.2)
        for archive in archives:
            subprocess.run([*base, "images", "import", str(archive)], check=True,
                           capture_output=True)  # fmt: skip
        out = subprocess.run([*base, "images", "ls", "-q"], check=True, capture_output=True,
                             text=True).stdout  # fmt: skip
        return out.split()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(workdir))
        ]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
