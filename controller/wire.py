"""What the gRPC server does before a handler runs: bytes that are not the request message
answer INVALID_ARGUMENT (no traceback; the log line is rate-limited), and a wrapper that runs
a check ahead of any kind of handler."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request whose bytes did not parse as its message."""

    def __init__(self, error: str) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Undecodable({self.error!r})"


def undecodable(message: object) -> bool:
    return isinstance(message, Undecodable)


class RateLimitedLog:
    """At most one line per `interval` seconds; the next line says how many were dropped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = float("-inf")
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        self._last = now
        if self.suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(message, *args)


_decode_failures = RateLimitedLog(log)


def guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return Undecodable(str(exc) or type(exc).__name__)

    return decode


async def refuse_undecodable(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        _decode_failures.warning("undecodable request from %s: %s", context.peer(),
                                 request.error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "the request is not a valid protobuf message of its type")


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Outermost: garbage bytes get INVALID_ARGUMENT before anything else looks at them."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, None, guarded(handler.request_deserializer),
                            check_request=refuse_undecodable)


Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]
RequestCheck = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def wrap_handler(handler: grpc.RpcMethodHandler, check: Check | None,
                 deserializer: Callable[[bytes], Any] | None = None,
                 check_request: RequestCheck | None = None) -> grpc.RpcMethodHandler:
    """The same handler, running `check` (and `check_request` on a unary request) first; a
    check refuses by aborting the call."""
    decode = deserializer or handler.request_deserializer
    serialize = handler.response_serializer

    async def before(request: Any, context: grpc.aio.ServicerContext) -> None:
        if check_request is not None:
            await check_request(request, context)
        if check is not None:
            await check(context)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, lambda context: before(None, context)),
            decode, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, before, unary=True), decode, serialize)
    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await before(None, context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, serialize)
    inner_uu = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await before(request, context)
        return await inner_uu(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)


def _streaming(inner: Callable[..., Any], first: Callable[..., Awaitable[None]],
               unary: bool = False) -> Callable[..., Any]:
    """Wrap a response-streaming behaviour in the form it has: an async generator, or a
    coroutine that writes through its context."""

    async def run_first(request: Any, context: grpc.aio.ServicerContext) -> None:
        await (first(request, context) if unary else first(context))

    if inspect.isasyncgenfunction(inner):
        async def generator(request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            await run_first(request, context)
            async for response in inner(request, context):
                yield response

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await run_first(request, context)
        return await inner(request, context)

    return coroutine
