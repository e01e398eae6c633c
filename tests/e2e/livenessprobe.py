"""A stand-in for the livenessprobe sidecar (test image only; real clusters use upstream's).

The Go module proxy reachable here refuses github.com/kubernetes-csi/livenessprobe, so the e2e
node cannot build the real sidecar. What it does for the kubelet is small: serve HTTP
`GET /healthz` on `--http-endpoint` (or `--health-port`), and answer each request by calling
the driver's `csi.v1.Identity/Probe` over `--csi-address` within `--probe-timeout`: 200 when
the driver says ready (an absent `ready` counts as ready, as the CSI spec says), 500 when it
says not ready, fails or does not answer in time. The messages are encoded by hand (Probe's
request is empty; its response holds one BoolValue), so only grpcio is needed.

    python3 livenessprobe.py --csi-address=/csi/csi.sock --http-endpoint=:9808 --probe-timeout=3s
"""

from __future__ import annotations

import argparse
import http.server
import logging
import re
import signal
import sys
import threading

import grpc

PROBE = "/csi.v1.Identity/Probe"
log = logging.getLogger("livenessprobe-standin")


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> dict[int, int | bytes]:
    """The varint and length-delimited fields of a message (last one wins)."""
    out: dict[int, int | bytes] = {}
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            out[field], i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            out[field] = buf[i : i + n]
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def decode_probe_response(buf: bytes) -> bool:
    """ProbeResponse{google.protobuf.BoolValue ready = 1}: absent means ready."""
    ready = _fields(buf).get(1)
    if ready is None:
        return True
    assert isinstance(ready, bytes)
    return bool(_fields(ready).get(1, 0))


def parse_duration(text: str) -> float:
    """A Go duration as the real sidecar takes it: 3s, 500ms, 1m, 1m30s."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


class Prober:
    def __init__(self, csi_address: str, timeout: float) -> None:
        target = csi_address if "://" in csi_address else f"unix://{csi_address}"
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.unary_unary(
            PROBE, request_serializer=None, response_deserializer=None
        )
        self.timeout = timeout

    def probe(self) -> tuple[bool, str]:
        try:
            reply = bytes(self.call(b"", timeout=self.timeout))
        except grpc.RpcError as exc:
            return False, f"probe failed: {exc.code()}: {exc.details()}"
        if decode_probe_response(reply):
            return True, "ok"
        return False, "driver is not ready"


def server(prober: Prober, host: str, port: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            ok, msg = prober.probe()
            if not ok:
                log.warning("healthz: %s", msg)
            body = (msg + "\n").encode()
            self.send_response(200 if ok else 500)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return http.server.ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="livenessprobe (stowage stand-in)")
    ap.add_argument("--csi-address", default="/run/csi/socket")
    ap.add_argument("--http-endpoint", default="", help="host:port, e.g. :9808")
    ap.add_argument("--health-port", type=int, default=9808)
    ap.add_argument("--probe-timeout", type=parse_duration, default=1.0)
    ap.add_argument("--v", default="0")  # accepted like the real sidecar's klog flag
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = "", a.health_port
    if a.http_endpoint:
        host, _, p = a.http_endpoint.rpartition(":")
        port = int(p)
    httpd = server(Prober(a.csi_address, a.probe_timeout), host, port)
    log.info("serving /healthz on %s:%d, probing %s", host, httpd.server_address[1], a.csi_address)
    # PID 1 in a container: SIGTERM has no default action there, so stop on it explicitly
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown).start())
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
