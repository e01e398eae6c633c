"""driver.csi.interceptors.CallInterceptor: every RPC is timed, counted, logged without secrets,
and its errors mapped to gRPC codes (domain errors by table, anything else INTERNAL).

The module is imported per test (fixture) so an import failure shows up as failing tests here
instead of a collection error that would stop the whole unit run."""

from __future__ import annotations

import importlib
import logging
import os
from concurrent import futures
from typing import Any

import grpc
import pytest

from csi_proto import csi_pb2
from driver import errors
from driver.metrics import Metrics

CANARY = "hunter2-CANARY-7f3a"


@pytest.fixture
def CallInterceptor() -> Any:
    return importlib.import_module("driver.csi.interceptors").CallInterceptor


# --- CallInterceptor with a fake context --------------------------------------------------------
class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _wrap(
    CallInterceptor: Any, fn: Any, metrics: Metrics, method: str = "/csi.v1.Node/NodeStageVolume"
) -> Any:
    handler = grpc.unary_unary_rpc_method_handler(fn)
    wrapped = CallInterceptor(metrics).intercept_service(lambda d: handler, Details(method))
    assert wrapped is not None
    return wrapped.unary_unary


def _count(m: Metrics, method: str, code: str) -> float:
    return (
        m.registry.get_sample_value("stowage_operations_total", {"method": method, "code": code})
        or 0.0
    )


def test_interceptor_passes_responses_through(CallInterceptor: Any) -> None:
    m = Metrics()
    call = _wrap(CallInterceptor, lambda req, ctx: "response", m)
    ctx = FakeContext()
    assert call(csi_pb2.NodeStageVolumeRequest(), ctx) == "response"
    assert ctx.code is None
    assert _count(m, "NodeStageVolume", "OK") == 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound("volume v-1 does not exist"), grpc.StatusCode.NOT_FOUND),
        (errors.Aborted("busy"), grpc.StatusCode.ABORTED),
        (errors.CommandFailed(["blkid"], 4, "", "bad"), grpc.StatusCode.INTERNAL),
    ],
)
def test_interceptor_maps_domain_errors(
    CallInterceptor: Any, exc: Exception, code: grpc.StatusCode
) -> None:
    m = Metrics()

    def fail(req: Any, ctx: Any) -> Any:
        raise exc

    ctx = FakeContext()
    with pytest.raises(Aborted):
        _wrap(CallInterceptor, fail, m)(csi_pb2.NodeStageVolumeRequest(), ctx)
    assert ctx.code is code and ctx.details == str(exc)
    assert _count(m, "NodeStageVolume", code.name) == 1


def test_interceptor_unexpected_exception_is_internal_and_logs_no_secret(
    CallInterceptor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = Metrics()

    def fail(req: Any, ctx: Any) -> Any:
        return {}["missing"]

    ctx = FakeContext()
    req = csi_pb2.NodeStageVolumeRequest(volume_id="v-x", secrets={"pw": CANARY})
    with caplog.at_level(logging.DEBUG, logger="driver.rpc"), pytest.raises(Aborted):
        _wrap(CallInterceptor, fail, m)(req, ctx)
    assert ctx.code is grpc.StatusCode.INTERNAL
    assert ctx.details.startswith("internal error: KeyError")
    assert CANARY not in caplog.text
    assert "v-x" in caplog.text  # the request itself is logged, redacted
    assert _count(m, "NodeStageVolume", "INTERNAL") == 1


def test_interceptor_leaves_unknown_methods_alone(CallInterceptor: Any) -> None:
    assert CallInterceptor(Metrics()).intercept_service(lambda d: None, Details("/x/Y")) is None


# --- CallInterceptor on a real server over a unix socket ----------------------------------------
def test_interceptor_on_real_server(CallInterceptor: Any, tmp_path: os.PathLike[str]) -> None:
    def ok(req: csi_pb2.NodeGetInfoRequest, ctx: Any) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id="node-a")

    def busy(req: Any, ctx: Any) -> Any:
        raise errors.Aborted("an operation on v-1 is already in progress")

    def crash(req: Any, ctx: Any) -> Any:
        raise ZeroDivisionError("oops")

    def h(fn: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=csi_pb2.NodeGetInfoRequest.FromString,
            response_serializer=csi_pb2.NodeGetInfoResponse.SerializeToString,
        )

    metrics = Metrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[CallInterceptor(metrics)]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.S", {"Ok": h(ok), "Busy": h(busy), "Crash": h(crash)}
            )
        ]
    )
    sock = "unix://" + os.path.join(str(tmp_path), "s.sock")
    server.add_insecure_port(sock)
    server.start()
    try:
        with grpc.insecure_channel(sock) as ch:

            def stub(name: str) -> Any:
                return ch.unary_unary(
                    f"/t.S/{name}",
                    request_serializer=csi_pb2.NodeGetInfoRequest.SerializeToString,
                    response_deserializer=csi_pb2.NodeGetInfoResponse.FromString,
                )

            assert stub("Ok")(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id == "node-a"
            with pytest.raises(grpc.RpcError) as info:
                stub("Busy")(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert info.value.code() is grpc.StatusCode.ABORTED
            assert "already in progress" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                stub("Crash")(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert info.value.code() is grpc.StatusCode.INTERNAL
            assert "ZeroDivisionError" in info.value.details()
    finally:
        server.stop(None)
    assert _count(metrics, "Busy", "ABORTED") == 1 and _count(metrics, "Crash", "INTERNAL") == 1
