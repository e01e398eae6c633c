"""Backup figures (issue 16): Stowage's backup engine and `restic` back up the same volume image
into the same S3 store (SeaweedFS `weed mini` on loopback, started once), in the same run.

Scenario: a volume image on an XFS reflink pool, most of it written (part compressible, part
random, the rest holes). Full backup; then 1% of the volume rewritten as random 1 MiB-aligned
writes and backed up again; then a backup with nothing changed; then a restore by each tool.
Stowage backs up reflink snapshots of the volume (as the driver does) with the previous one as
the local base; restic backs up the volume file itself (same path each time, so it finds its
parent snapshot). Before every timed read the page cache of the file read is dropped
(`posix_fadvise(DONTNEED)`; the pool is a direct-I/O loop device, so reads reach the disk).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from driver.backup import Credentials, Repository, RepositoryKey, parse_target
from driver.backup.engine import SnapshotRecord
from driver.backup.extents import reflink
from driver.backup.format import Manifest, chunk_key_name
from driver.host import memory
from tests.backup.conftest import ACCESS_KEY, SECRET_KEY, S3Server

MiB = 1 << 20
GiB = 1 << 30
#: The volume is laid out in regions of this size, cycling compressible, random, compressible,
#: random, hole: 4/5 of it written, half of that compressible.
REGION = 64 * MiB
PATTERN = ("compressible", "random", "compressible", "random", "hole")
#: Compressible data: text of words drawn at random from a 256-word vocabulary (like logs or
#: source: zstd compresses it about 3.3x at level 3). Every block differs, so no tool can
#: deduplicate it.
_WORDS = random.Random(5)  # noqa: S311 - reproducible vocabulary, not secrets
_VOCAB = [
    bytes(_WORDS.choice(b"etaoinshrdlucmfwypvbgkqjxz"[: _WORDS.randint(5, 26)])
          for _ in range(_WORDS.randint(2, 9))) + (b"\n" if i % 17 == 0 else b" ")
    for i in range(256)
]


@dataclass(frozen=True)
class Settings:
    volume: int
    rewrite_fraction: float
    free_needed: int
    workers: int
    restore_check_blocks: int


FULL = Settings(10 * GiB, 0.01, 35 * GiB, 4, 64)
QUICK = Settings(1 * GiB, 0.01, 4 * GiB, 4, 16)


class _Weed(S3Server):
    """`weed mini` as the backup tests start it, with volumes big enough for GiBs of chunks."""

    def argv(self) -> list[str]:
        out = super().argv()
        return [a if not a.startswith("-master.volumeSizeLimitMB=") else
                "-master.volumeSizeLimitMB=1024" for a in out]


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _block(kind: str) -> bytes:
    if kind == "random":
        return os.urandom(MiB)
    return b"".join([_VOCAB[x] for x in os.urandom(MiB // 5)])[:MiB]


def write_volume(path: str, size: int) -> dict[str, int]:
    """The initial image: regions per PATTERN; returns bytes written of each kind."""
    written = {"compressible": 0, "random": 0}
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for i, off in enumerate(range(0, size, REGION)):
            kind = PATTERN[i % len(PATTERN)]
            if kind == "hole":
                continue
            for o in range(off, min(off + REGION, size), MiB):
                os.pwrite(fd, _block(kind), o)
                written[kind] += MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def rewrite(path: str, size: int, fraction: float, rng: random.Random) -> int:
    """Random 1 MiB-aligned writes of random data over `fraction` of the volume."""
    blocks = rng.sample(range(size // MiB), max(1, int(size // MiB * fraction)))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for b in blocks:
            os.pwrite(fd, os.urandom(MiB), b * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(blocks) * MiB


def _same_blocks(a: str, b: str, n: int, rng: random.Random) -> bool:
    """Sizes equal and `n` random 1 MiB blocks identical (a cheap check that a restore is right;
    tests/backup proves restores bit for bit)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    size = os.path.getsize(a)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in sorted(rng.randrange(0, size // MiB) * MiB for _ in range(n)):
            fa.seek(off)
            fb.seek(off)
            if fa.read(MiB) != fb.read(MiB):
                return False
    return True


def _object_sizes(server: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    client: Any = server.client()
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[str(o["Key"])] = int(o["Size"])
    return out


def _inblock() -> int:
    """Bytes this process and its reaped children read from block devices so far (page cache
    hits are not counted)."""
    return 512 * (resource.getrusage(resource.RUSAGE_SELF).ru_inblock
                  + resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock)


def _cpu_self_children() -> float:
    """CPU seconds of this process (the engine's threads) and its reaped children (restic)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _cpu_of(server: S3Server) -> float:
    """CPU seconds the S3 server process has used so far."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """fn(), its wall time and the bytes it read from disk."""
    r0, t0 = _inblock(), time.monotonic()
    out = fn()
    return out, time.monotonic() - t0, _inblock() - r0


class Ours:
    """Stowage's engine as the node driver runs it (the same default worker count): reflink
    snapshots of the volume, each backed up with the previous one as its local base."""

    name = "stowage"

    def __init__(self, server: S3Server, bucket: str, vol: str, work: str,
                 settings: Settings) -> None:
        self.server, self.bucket, self.vol, self.work = server, bucket, vol, work
        target = parse_target(f"bench=s3://{bucket}/stowage?endpoint={server.endpoint}")
        self.repo = Repository.open(target, RepositoryKey.from_bytes(os.urandom(32)),
                                    "bench-cluster", workers=settings.workers,
                                    credentials=Credentials(ACCESS_KEY, SECRET_KEY))
        self.base: tuple[str, Manifest] | None = None
        self.n = 0

    def version(self) -> str:
        return f"workers={self.repo.workers}"

    def backup(self) -> dict[str, Any]:
        self.n += 1
        name = f"snap-{self.n}"
        path = os.path.join(self.work, name)
        reflink(self.vol, path)
        _drop_cache(path)
        r, t, disk = _timed(lambda: self.repo.backup(path, SnapshotRecord(name, "bench-volume"),
                                                      self.base))
        if self.base is not None:  # the new snapshot is the next base, as in the driver
            os.unlink(self.base[0])
        self.base = (path, r.manifest)
        return {"s": t, "mode": r.mode, "read_bytes": r.read_bytes, "disk_read_bytes": disk,
                "uploaded_bytes": r.uploaded_bytes, "uploaded_chunks": r.uploaded_chunks}

    def stored_bytes(self) -> int:
        return sum(_object_sizes(self.server, self.bucket, "stowage/").values())

    def compression(self) -> float | None:
        """Plain / sealed bytes of the chunks at compressible offsets (exact)."""
        assert self.base is not None
        sizes = _object_sizes(self.server, self.bucket, "stowage/chunks/")
        plain = sealed = 0
        seen: set[str] = set()
        for c in self.base[1].chunks:  # after the full backup: every entry is a whole chunk
            if c.id is None or c.id in seen:
                continue
            seen.add(c.id)
            if PATTERN[c.offset // REGION % len(PATTERN)] == "compressible":
                plain += c.length
                sealed += sizes["stowage/" + chunk_key_name(c.id)]
        return plain / sealed if sealed else None

    def restore(self, dest_dir: str) -> str:
        assert self.base is not None
        dest = os.path.join(dest_dir, "volume.img")
        self.repo.restore(self.base[1].snapshot_id, dest)
        return dest


class ResticTool:
    """restic on the volume file itself (same path every time: it finds its parent snapshot
    and skips an unchanged file; a changed file it reads whole)."""

    name = "restic"

    def __init__(self, base: str, server: S3Server, bucket: str, vol: str) -> None:
        self.server, self.bucket, self.vol = server, bucket, vol
        self.environ = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "RESTIC_PASSWORD": "stowage-bench",
            "RESTIC_REPOSITORY": f"s3:{server.endpoint}/{bucket}/restic",
            "RESTIC_CACHE_DIR": os.path.join(base, "restic-cache"),
        }
        self.run("init")

    def run(self, *args: str) -> str:
        res = subprocess.run(["restic", *args], env=self.environ, capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"restic {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip()[-800:]}")
        return res.stdout

    def version(self) -> str:
        return self.run("version").strip()

    def _backup(self) -> dict[str, Any]:
        """Back the volume up; the JSON summary restic prints at the end."""
        out = self.run("backup", "--json", self.vol)
        for line in reversed(out.splitlines()):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("message_type") == "summary":
                return doc
        raise RuntimeError("restic backup printed no summary")

    def backup(self) -> dict[str, Any]:
        _drop_cache(self.vol)
        before = self.stored_bytes()
        summary, t, disk = _timed(self._backup)
        return {"s": t, "read_bytes": disk, "disk_read_bytes": disk,
                "processed_bytes": int(summary.get("total_bytes_processed", 0)),
                "uploaded_bytes": self.stored_bytes() - before,
                "data_added": summary.get("data_added")}

    def stored_bytes(self) -> int:
        return sum(_object_sizes(self.server, self.bucket, "restic/").values())

    def compression(self) -> float | None:
        return None  # restic reports no per-region figure; see stored_bytes

    def restore(self, dest_dir: str) -> str:
        # restic 0.14 has no --sparse (0.15 has): it writes the zeros of the holes.
        self.run("restore", "latest", "--target", dest_dir)
        subprocess.run(["sync", "-f", dest_dir], check=True)  # ours fsyncs before it returns
        return os.path.join(dest_dir, self.vol.lstrip("/"))


def run(base: str, pool_mount: str, settings: Settings, log: Callable[[str], None]
        ) -> dict[str, Any]:
    """The backup section in the bench's temporary directory `base`, the volume on the XFS pool
    mounted at `pool_mount` (both made, and cleaned up, by the caller). Phases alternate between
    the tools (Stowage first, then restic, per phase) so that both see the same machine at about
    the same time."""
    out: dict[str, Any] = {"settings": dict(settings.__dict__), "skipped": []}
    # The engine runs in this process: the allocator as the driver sets it for its data path.
    out["allocator_tuned"] = memory.keep_large_buffers()
    free = shutil.disk_usage(base).free
    out["free_bytes"] = free
    if free < settings.free_needed:
        msg = (f"backup section skipped: {free / GiB:.1f} GiB free under {base}, it needs "
               f"{settings.free_needed / GiB:.0f} GiB (volume, snapshots, restores and both "
               "tools' stores)")
        log("  " + msg)
        out["skipped"].append(msg)
        return out
    have_restic = shutil.which("restic") is not None
    if not have_restic:
        msg = ("restic comparison skipped: the `restic` command is not installed "
               "(make bench-deps installs the Debian package)")
        log("  " + msg)
        out["skipped"].append(msg)
    rng = random.Random(16)  # noqa: S311 - reproducible layout, not secrets
    size = settings.volume
    work = os.path.join(pool_mount, "backup-bench")
    os.makedirs(work)
    vol = os.path.join(work, "volume.img")
    log(f"  writing the volume image ({size / GiB:.0f} GiB)")
    written, t_write, _ = _timed(lambda: write_volume(vol, size))
    data_bytes = sum(written.values())
    out["volume"] = {"size": size, "written": written, "data_bytes": data_bytes,
                     "write_s": t_write}
    log(f"    {data_bytes / GiB:.2f} GiB written in {t_write:.0f} s")
    server = _Weed("seaweedfs", os.path.join(base, "weed"))
    os.makedirs(server.base)
    try:
        server.start()
        bucket = server.make_bucket()
        tools: list[Ours | ResticTool] = [Ours(server, bucket, vol, work, settings)]
        if have_restic:
            tools.append(ResticTool(base, server, bucket, vol))
        res: dict[str, dict[str, Any]] = {t.name: {"version": t.version()} for t in tools}
        out["tools"] = res
        for phase in ("full", "incremental", "unchanged", "restore"):
            if phase == "incremental":
                out["rewritten_bytes"] = rewrite(vol, size, settings.rewrite_fraction, rng)
            for t in list(tools):
                log(f"  {t.name}: {phase}")
                c0, w0 = _cpu_self_children(), _cpu_of(server)
                try:
                    d = _phase(t, phase, vol, work, data_bytes, settings, rng)
                except RuntimeError as exc:
                    if not isinstance(t, ResticTool):
                        raise
                    msg = f"restic dropped from the comparison at {phase}: {exc}"
                    log("  " + msg)
                    out["skipped"].append(msg)
                    tools.remove(t)
                    continue
                d["client_cpu_s"] = _cpu_self_children() - c0
                d["s3_server_cpu_s"] = _cpu_of(server) - w0
                res[t.name][phase] = d
                log("    " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in d.items()))
    finally:
        server.stop()
    return out


def _phase(t: Ours | ResticTool, phase: str, vol: str, work: str, data_bytes: int,
           settings: Settings, rng: random.Random) -> dict[str, Any]:
    if phase == "restore":
        dest_dir = os.path.join(work, "restore-" + t.name)
        os.makedirs(dest_dir)
        try:
            dest, secs, _ = _timed(lambda: t.restore(dest_dir))
            ok = _same_blocks(dest, vol, settings.restore_check_blocks, rng)
        finally:
            shutil.rmtree(dest_dir)
        d: dict[str, Any] = {"s": secs, "MiB_s": data_bytes / MiB / secs, "sample_check": ok}
    else:
        d = t.backup()
        if phase == "full":
            d["MiB_s"] = data_bytes / MiB / d["s"]
            d["stored_bytes"] = t.stored_bytes()
            d["compression_ratio_compressible"] = t.compression()
    d["load_avg_1m"] = os.getloadavg()[0]
    return d
