"""One interceptor for every RPC: log (secrets stripped), time, count, map errors to codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from driver.csi import status
from driver.csi.redact import loggable
from driver.errors import StowageError
from driver.metrics import Metrics

log = logging.getLogger("driver.rpc")


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # grpc's classes are not subscriptable at run time
    _Interceptor = grpc.ServerInterceptor


class CallInterceptor(_Interceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Wrapped handler per full method name: the servicers are fixed once the server
        # starts, so each method is wrapped once instead of on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        wrapped = self._wrapped.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            wrapped = self._wrap_unary(method, handler)
        elif handler.unary_stream is not None:
            wrapped = self._wrap_stream(method, handler)
        else:
            return handler
        self._wrapped[details.method] = wrapped
        return wrapped

    def _finish(
        self,
        method: str,
        request: Any,
        started: float,
        exc: BaseException | None,
        context: grpc.ServicerContext,
    ) -> None:
        """Count and log the call's outcome; a failure aborts the call with its code."""
        code, message = grpc.StatusCode.OK, ""
        if isinstance(exc, StowageError):
            code, message = status.code_for(exc), str(exc)
        elif exc is not None:
            log.error(
                "%s failed unexpectedly; request: %s",
                method,
                loggable(request),
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            code, message = (
                grpc.StatusCode.INTERNAL,
                f"internal error: {type(exc).__name__}: {exc}",
            )
        elapsed = time.monotonic() - started
        self._metrics.observe(method, code.name, elapsed)
        if code is grpc.StatusCode.OK:
            log.info("%s ok in %.3fs", method, elapsed)
            return
        level = logging.WARNING if code is not grpc.StatusCode.INTERNAL else logging.ERROR
        log.log(level, "%s -> %s in %.3fs: %s", method, code.name, elapsed, message)
        context.abort(code, message)

    @staticmethod
    def _start(method: str, request: Any) -> float:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s request: %s", method, loggable(request))
        return time.monotonic()

    def _wrap_unary(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        inner = handler.unary_unary
        assert inner is not None

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = self._start(method, request)
            try:
                response = inner(request, context)
            except Exception as exc:  # noqa: BLE001 - every failure gets a code in _finish
                self._finish(method, request, started, exc, context)
                return None  # not reached: _finish aborts
            self._finish(method, request, started, None, context)
            return response

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Server streaming (SnapshotMetadata): errors before or during the stream get their
        code the same way; the call is timed until its last message."""
        inner = handler.unary_stream
        assert inner is not None

        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = self._start(method, request)
            try:
                yield from inner(request, context)
            except Exception as exc:  # noqa: BLE001 - every failure gets a code in _finish
                self._finish(method, request, started, exc, context)
                return
            self._finish(method, request, started, None, context)

        return grpc.unary_stream_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
