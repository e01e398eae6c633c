"""One interceptor for every RPC: log (secrets stripped), time, count, map errors to codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrap(details.method, handler)
        self._wrapped[details.method] = wrapped
        return wrapped

    def _wrap(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = full_method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        assert inner is not None  # intercept_service wraps unary-unary handlers only
        metrics = self._metrics

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s request: %s", method, loggable(request))
            code, message = grpc.StatusCode.OK, ""
            try:
                response = inner(request, context)
            except StowageError as exc:
                code, message = status.code_for(exc), str(exc)
            except Exception as exc:
                log.exception("%s failed unexpectedly; request: %s", method, loggable(request))
                code, message = (
                    grpc.StatusCode.INTERNAL,
                    f"internal error: {type(exc).__name__}: {exc}",
                )
            elapsed = time.monotonic() - started
            metrics.observe(method, code.name, elapsed)
            if code is grpc.StatusCode.OK:
                log.info("%s ok in %.3fs", method, elapsed)
                return response
            level = logging.WARNING if code is not grpc.StatusCode.INTERNAL else logging.ERROR
            log.log(level, "%s -> %s in %.3fs: %s", method, code.name, elapsed, message)
            context.abort(code, message)
            return None  # not reached: abort raises

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
