"""Bearer-token authentication and TLS credentials for the controller's gRPC port.

With tokens configured, every call except the health and reflection services must
carry `authorization: Bearer <token>` metadata; agents present a token the same way.
TLS is on when a certificate is configured; with a client CA too, callers must also
present a certificate signed by it (mutual TLS, as agents do).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

# Services anyone may call: probes and tooling that must work before credentials do.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_tokens(inline: Iterable[str], file: str) -> list[str]:
    """Tokens from the config list and from a file with one token per line (# comments)."""
    tokens = [t.strip() for t in inline if t.strip()]
    if file:
        for line in Path(file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.append(line)
    return tokens


def server_credentials(cert_file: str, key_file: str,
                       client_ca_file: str = "") -> grpc.ServerCredentials:
    cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = [t.encode() for t in tokens]

    def _authorised(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer":
                    given = token.strip().encode()
                    # Compare against every token in constant time.
                    return any([hmac.compare_digest(given, t) for t in self.tokens])
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES) or self._authorised(
                handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        return _deny(await continuation(handler_call_details), method)


def _deny(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler:
    message = f"{method} needs an 'authorization: Bearer <token>' header with a valid token"

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(
            refuse, request_deserializer=handler.request_deserializer if handler else None,
            response_serializer=handler.response_serializer if handler else None)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(
        refuse, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
