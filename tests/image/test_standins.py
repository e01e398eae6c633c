"""The e2e stand-ins for the livenessprobe and node-driver-registrar sidecars."""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.e2e import livenessprobe, registrar


def bool_value(v: bool) -> bytes:
    return b"\x08\x01" if v else b""


@contextlib.contextmanager
def fake_driver(sock: str, answer: list[bytes | None]) -> Iterator[None]:
    """Identity/Probe and GetPluginInfo; answer[0] is Probe's reply (None: abort)."""

    def probe(_req: bytes, ctx: grpc.ServicerContext) -> bytes:
        if answer[0] is None:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "pool missing")
        return answer[0] or b""

    def info(_req: bytes, _ctx: grpc.ServicerContext) -> bytes:
        return registrar._string(1, "stowage.csi.io") + registrar._string(2, "0.1.0")

    ident = lambda b: b  # noqa: E731
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=ident, response_serializer=ident
        )
        for name, fn in (("Probe", probe), ("GetPluginInfo", info))
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("csi.v1.Identity", handlers),)
    )
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        yield
    finally:
        server.stop(grace=None)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_decode_probe_response() -> None:
    assert livenessprobe.decode_probe_response(b"") is True  # absent ready = ready
    assert livenessprobe.decode_probe_response(b"\x0a\x02\x08\x01") is True
    assert livenessprobe.decode_probe_response(b"\x0a\x00") is False  # ready = false


@pytest.mark.parametrize(("text", "seconds"), [("3s", 3.0), ("500ms", 0.5), ("1m30s", 90.0)])
def test_durations(text: str, seconds: float) -> None:
    assert livenessprobe.parse_duration(text) == seconds


def test_healthz_follows_the_driver_probe(tmp_path: Path) -> None:
    sock = str(tmp_path / "csi.sock")
    answer: list[bytes | None] = [b""]
    with fake_driver(sock, answer):
        httpd = livenessprobe.server(livenessprobe.Prober(sock, 2.0), "127.0.0.1", 0)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            assert get(url + "/healthz") == (200, "ok\n")
            answer[0] = b"\x0a\x02\x08\x01"
            assert get(url + "/healthz")[0] == 200
            answer[0] = b"\x0a\x00"
            assert get(url + "/healthz") == (500, "driver is not ready\n")
            answer[0] = None
            status, body = get(url + "/healthz")
            assert status == 500 and "FAILED_PRECONDITION" in body
            assert get(url + "/other")[0] == 404
        finally:
            httpd.shutdown()
            httpd.server_close()


def test_healthz_fails_without_a_driver(tmp_path: Path) -> None:
    prober = livenessprobe.Prober(str(tmp_path / "nothing.sock"), 0.5)
    ok, msg = prober.probe()
    assert not ok and "probe failed" in msg


def test_registrar_names_the_driver_and_probe_mode(tmp_path: Path) -> None:
    sock = str(tmp_path / "csi.sock")
    with fake_driver(sock, [b""]):
        assert registrar.plugin_name(sock) == "stowage.csi.io"
    status = tmp_path / registrar.STATUS_NAME
    probe = [
        f"--csi-address={sock}",
        "--kubelet-registration-path=/x/csi.sock",
        "--mode=kubelet-registration-probe",
    ]
    assert registrar.main(probe) == 1
    status.write_text("registered\n")
    assert registrar.main(probe) == 0


def test_registrar_serves_the_kubelet_and_reports_registration(tmp_path: Path) -> None:
    """Run the stand-in as the image does; play the kubelet's two calls on its socket."""
    import subprocess
    import sys
    import time

    from tests.chart.util import REPO

    csi = tmp_path / "plugin" / "csi.sock"
    csi.parent.mkdir()
    reg_dir = tmp_path / "registry"
    args = [
        f"--csi-address={csi}",
        "--kubelet-registration-path=/var/lib/kubelet/plugins/stowage.csi.io/csi.sock",
        f"--plugin-registration-path={reg_dir}",
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests/e2e/registrar.py"),
            *args,
            "--driver-name=stowage.csi.io",
        ]
    )
    try:
        sock = reg_dir / "stowage.csi.io-reg.sock"
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        probe = [sys.executable, str(REPO / "tests/e2e/registrar.py"), *args,
                 "--mode=kubelet-registration-probe"]  # fmt: skip
        assert subprocess.run(probe, capture_output=True).returncode == 1
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            call = lambda m, b: ch.unary_unary(  # noqa: E731
                f"/pluginregistration.Registration/{m}",
                request_serializer=None, response_deserializer=None,
            )(b, timeout=5)  # fmt: skip
            info = call("GetInfo", b"")
            assert b"CSIPlugin" in info and b"/var/lib/kubelet/plugins/stowage.csi.io" in info
            call("NotifyRegistrationStatus", b"\x08\x01")
        deadline = time.monotonic() + 10
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "probe never saw the registration"
            time.sleep(0.3)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert not (reg_dir / "stowage.csi.io-reg.sock").exists()
