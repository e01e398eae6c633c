"""Real S3 servers on loopback for the backup suites: SeaweedFS (`weed mini`) and
`rclone serve s3`, both installed from PyPI by `make deps`. Each server is a process the fixture
started; it is stopped by that PID only, its temporary directory removed even on failure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from driver.backup import Credentials, Repository, RepositoryKey, Store, parse_target
from driver.ctl.s3local import (
    WEED_PORTS,
    free_port,
    launch,
    s3_client,
    stop_pid,
    weed_argv,
)
from harness import DriverProcess, Pool, make_pool

BIN = os.path.dirname(sys.executable)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCESS_KEY = "stowagetestak"
SECRET_KEY = "stowage-test-secret-key-0123456789"
KINDS = ["seaweedfs", "rclone"]


@dataclass
class S3Server:
    kind: str
    base: str
    port: int = 0
    extra_ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "server.log")

    def argv(self) -> list[str]:
        data = os.path.join(self.base, "data")
        os.makedirs(data, exist_ok=True)
        if self.kind == "rclone":
            return [os.path.join(BIN, "rclone"), "serve", "s3", "--addr",
                    f"127.0.0.1:{self.port}", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
                    "--config", os.path.join(self.base, "rclone.conf"), data]
        # the same weed mini that `make run` starts (driver/ctl/s3local.py)
        return weed_argv(self.base, self.port, self.extra_ports, ACCESS_KEY, SECRET_KEY)

    def start(self, timeout: float = 90.0) -> None:
        if not self.port:
            self.port = free_port()
            for name in WEED_PORTS:
                self.extra_ports[name] = free_port()
        try:
            self.proc = launch(self.argv(), self.base, self.log_path, self.client(),
                                     timeout)
        except RuntimeError as exc:
            raise AssertionError(f"{self.kind}: {exc}\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_pid(self.proc.pid)
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-4000:]
        except FileNotFoundError:
            return ""

    def client(self, secret: str = SECRET_KEY) -> object:
        return s3_client(self.endpoint, ACCESS_KEY, secret)

    def make_bucket(self) -> str:
        name = "b" + uuid.uuid4().hex[:16]
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name


def start_server(kind: str) -> tuple[S3Server, Callable[[], None]]:
    base = tempfile.mkdtemp(prefix=f"stowage-s3-{kind}-")
    server = S3Server(kind, base)

    def teardown() -> None:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)

    try:
        server.start()
    except BaseException:
        teardown()
        raise
    return server, teardown


@pytest.fixture(scope="session", params=KINDS)
def s3(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """A running S3 server of each kind, shared by the tests of a session."""
    server, teardown = start_server(request.param)
    try:
        yield server
    finally:
        teardown()


@pytest.fixture(params=KINDS)
def own_s3(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """A server of each kind that the test may stop and restart (same dir, same ports)."""
    server, teardown = start_server(request.param)
    try:
        yield server
    finally:
        teardown()


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


KEY = RepositoryKey.from_bytes(bytes(range(32)))
OTHER_KEY = RepositoryKey.from_bytes(bytes(range(1, 33)))

RepoFactory = Callable[..., Repository]


def make_repo(server: S3Server, bucket: str, key: RepositoryKey = KEY, *,
              secret: str | None = None, chunk_size: int = 64 << 10, workers: int = 4,
              max_attempts: int = 2, prefix: str = "pfx/x", cluster_id: str = "cluster-a",
              **kw: object) -> Repository:
    target = parse_target(f"t1=s3://{bucket}/{prefix}?endpoint={server.endpoint}")
    creds = Credentials(ACCESS_KEY, secret or SECRET_KEY)
    store = Store(target, creds, max_attempts=max_attempts, connect_timeout=2, read_timeout=20)
    return Repository(store, key, cluster_id=cluster_id, chunk_size=chunk_size,
                      workers=workers, **kw)  # type: ignore[arg-type]


@pytest.fixture
def repo_factory(s3: S3Server) -> RepoFactory:
    """Repositories in a fresh bucket of the session's server (one bucket per test)."""
    bucket = s3.make_bucket()

    def make(key: RepositoryKey = KEY, **kw: object) -> Repository:
        return make_repo(s3, bucket, key, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def pools() -> Iterator[Callable[[], Pool]]:
    """Pools made on demand (one per node), all torn down at the end."""
    assert os.geteuid() == 0, "needs root (loop devices, mkfs, mount)"
    teardowns: list[Callable[[], None]] = []

    def make() -> Pool:
        p, teardown = make_pool()
        teardowns.append(teardown)
        return p

    try:
        yield make
    finally:
        for t in reversed(teardowns):
            t()


@pytest.fixture
def drivers() -> Iterator[list[DriverProcess]]:
    """Driver processes a test started (one per node), stopped by PID at the end."""
    started: list[DriverProcess] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop(signal.SIGKILL if d.proc and d.proc.poll() is None else signal.SIGTERM)
