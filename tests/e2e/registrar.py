"""A stand-in for node-driver-registrar: kubelet plugin registration (pluginregistration v1).

The Go module proxy reachable here refuses github.com/kubernetes-csi/node-driver-registrar at
every version (403 "This module version is not available"), so the e2e node cannot build the
real sidecar. What the sidecar does for the kubelet is small: serve
`pluginregistration.Registration` on `<kubelet root>/plugins_registry/<driver>-reg.sock`,
answer GetInfo with {type CSIPlugin, name, endpoint = the driver's CSI socket, versions} and
take NotifyRegistrationStatus. The two messages are encoded by hand (four string fields, a bool
and a string), so no generated code is needed.

    reg = Registrar(kubelet_root, "stowage.csi.io", "/path/csi.sock").start()
    ...
    reg.status  # None until the kubelet answered, then (registered, error)
    reg.stop()
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent import futures

import grpc

SERVICE = "pluginregistration.Registration"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _string(field: int, value: str) -> bytes:
    raw = value.encode()
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def encode_plugin_info(kind: str, name: str, endpoint: str, versions: list[str]) -> bytes:
    out = _string(1, kind) + _string(2, name) + _string(3, endpoint)
    return out + b"".join(_string(4, v) for v in versions)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def decode_registration_status(buf: bytes) -> tuple[bool, str]:
    registered, error, i = False, "", 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
            if field == 1:
                registered = bool(value)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            if field == 2:
                error = buf[i : i + n].decode(errors="replace")
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return registered, error


class Registrar:
    def __init__(
        self,
        kubelet_root: str,
        driver: str,
        csi_endpoint: str,
        versions: tuple[str, ...] = ("1.0.0",),
    ) -> None:
        self.socket = os.path.join(kubelet_root, "plugins_registry", f"{driver}-reg.sock")
        self.info = encode_plugin_info("CSIPlugin", driver, csi_endpoint, list(versions))
        self.status: tuple[bool, str] | None = None
        self.notified = threading.Event()
        self._server: grpc.Server | None = None

    def _get_info(self, _request: bytes, _context: grpc.ServicerContext) -> bytes:
        return self.info

    def _notify(self, request: tuple[bool, str], _context: grpc.ServicerContext) -> bytes:
        self.status = request
        self.notified.set()
        return b""

    def start(self) -> Registrar:
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        ident = lambda b: b  # noqa: E731
        handlers = {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self._get_info, request_deserializer=ident, response_serializer=ident
            ),
            "NotifyRegistrationStatus": grpc.unary_unary_rpc_method_handler(
                self._notify,
                request_deserializer=decode_registration_status,
                response_serializer=ident,
            ),
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


# --- the stand-in sidecar's command line (the e2e stand-in image runs this) --------------------

STATUS_NAME = ".registrar-standin-status"  # next to the driver's socket: writable in the pod


def status_file(csi_address: str) -> str:
    path = csi_address.removeprefix("unix://")
    return os.path.join(os.path.dirname(path) or ".", STATUS_NAME)


def plugin_name(csi_address: str, timeout: float = 5.0) -> str:
    """GetPluginInfo over the driver's socket: the driver name (field 1)."""
    target = csi_address if "://" in csi_address else f"unix://{csi_address}"
    with grpc.insecure_channel(target) as channel:
        reply = channel.unary_unary(
            "/csi.v1.Identity/GetPluginInfo", request_serializer=None, response_deserializer=None
        )(b"", timeout=timeout)
    reply = bytes(reply)
    i = 0
    while i < len(reply):
        key, i = _read_varint(reply, i)
        if key & 7 != 2:
            raise ValueError("unexpected GetPluginInfo field")
        n, i = _read_varint(reply, i)
        if key >> 3 == 1:
            return reply[i : i + n].decode()
        i += n
    raise ValueError("GetPluginInfo has no name")


def main(argv: list[str] | None = None) -> int:
    """node-driver-registrar's flags: register the driver with the kubelet, or (with
    --mode=kubelet-registration-probe) exit 0 only once the kubelet said it registered it.
    The kubelet's answer is kept in a file beside the driver's socket (--csi-address's
    directory, a writable hostPath in the chart's pod, whose root filesystem is read-only)."""
    import argparse
    import signal
    import sys
    import time

    ap = argparse.ArgumentParser(prog="csi-node-driver-registrar (stowage stand-in)")
    ap.add_argument("--csi-address", default="/run/csi/socket")
    ap.add_argument("--kubelet-registration-path", required=True,
                    help="the driver's socket as the kubelet sees it")
    ap.add_argument("--plugin-registration-path", default="/registration")
    ap.add_argument("--mode", default="registration",
                    choices=["registration", "kubelet-registration-probe"])
    ap.add_argument("--driver-name", default="", help="skip GetPluginInfo")
    ap.add_argument("--v", default="0")  # accepted like the real sidecar's klog flag
    a = ap.parse_args(argv)
    status_path = status_file(a.csi_address)
    if a.mode == "kubelet-registration-probe":
        try:
            with open(status_path) as fh:
                status = fh.read().strip()
        except FileNotFoundError:
            status = "not registered yet"
        print(status)
        return 0 if status == "registered" else 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(status_path)  # a previous run's answer is not this one's
    name = a.driver_name
    while not name:
        try:
            name = plugin_name(a.csi_address)
        except (grpc.RpcError, ValueError) as exc:
            print(f"waiting for the driver at {a.csi_address}: {exc}", file=sys.stderr)
            time.sleep(1)
    reg = Registrar("/", name, a.kubelet_registration_path)
    reg.socket = os.path.join(a.plugin_registration_path, f"{name}-reg.sock")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reg.start()
    print(f"serving {reg.socket} for {name} at {a.kubelet_registration_path}", file=sys.stderr)
    while not stop.wait(1):
        if reg.status is not None:
            ok, err = reg.status
            with open(status_path + ".part", "w") as fh:
                fh.write("registered\n" if ok else f"registration failed: {err}\n")
            os.replace(status_path + ".part", status_path)
    reg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
