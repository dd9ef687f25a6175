"""Who is calling, and may they: identities from tokens and certificates, one table of what
each RPC needs, and the TLS credentials of the controller's ports.

A caller is an agent (bound to one host id) or an API client (a role and namespaces), named
by a bearer token (`authorization: Bearer <token>`) or by a verified client certificate's
SAN URI (`controller.access`). Agents may open only the agent stream; clients never may.
Without an access file the controller is open: every caller is an admin of every namespace
and may act as any host, except that a certificate naming a host still binds its holder to
that host.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc

from controller.access import OPEN_ACCESS, Access, Caller, Role
from controller.wire import wrap_handler

log = logging.getLogger(__name__)

# Services anyone may call: probes and tooling that must work before credentials do.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Permission(StrEnum):
    READ = "read"            # see VMs and hosts
    LIFECYCLE = "lifecycle"  # create, change and delete VMs
    ADMIN = "admin"          # fleet operations: migration, fleet networks
    AGENT = "agent"          # speak for a host


_VM = "/vmm.v1.VmService/"
_HOST = "/vmm.v1.HostService/"
_NETWORK = "/vmm.v1.NetworkService/"
# What each RPC needs. A method missing here is refused to everyone but open access.
RPC_PERMISSIONS: dict[str, Permission] = {
    **{_VM + m: Permission.READ for m in (
        "GetVmInfo", "ListVms", "WatchVms", "GetConsoleLog", "StreamConsole")},
    **{_VM + m: Permission.LIFECYCLE for m in (
        "CreateVm", "DeleteVm", "BootVm", "ShutdownVm", "PauseVm", "ResumeVm", "RebootVm",
        "ResizeVm", "AttachDisk", "DetachDisk", "AttachNetworkInterface",
        "DetachNetworkInterface")},
    _VM + "MigrateVm": Permission.ADMIN,
    **{_HOST + m: Permission.READ for m in ("ListHosts", "GetHost", "GetBackendCapabilities")},
    **{_NETWORK + m: Permission.READ for m in ("GetNetwork", "ListNetworks")},
    **{_NETWORK + m: Permission.ADMIN for m in ("CreateNetwork", "DeleteNetwork")},
    "/vmm.agent.v1.AgentService/Connect": Permission.AGENT,
}

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.LIFECYCLE}),
    Role.ADMIN: frozenset({Permission.READ, Permission.LIFECYCLE, Permission.ADMIN}),
}

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=OPEN_ACCESS)


def current_caller() -> Caller:
    """The caller of the RPC being served (set before its handler runs)."""
    return _caller.get()


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def identify(access: Access | None, metadata: Iterable[tuple[str, Any]] | None,
             peer_uris: Iterable[str]) -> Caller:
    """The caller a token and a verified certificate's SAN URIs name; Refused if neither
    names anyone the access file knows, or if they name two different callers."""
    token = bearer_token(metadata)
    if access is None:
        certified = Access().for_certificate(peer_uris)
        return certified or OPEN_ACCESS
    by_certificate = access.for_certificate(peer_uris)
    by_token = None
    if token is not None:
        by_token = access.for_token(token)
        if by_token is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
    if by_token and by_certificate and not _same(by_token, by_certificate):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"the token ({by_token.describe()}) and the certificate "
                      f"({by_certificate.describe()}) name different callers")
    caller = by_token or by_certificate
    if caller is None:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                      "needs an 'authorization: Bearer <token>' header with a valid token or "
                      "a client certificate naming a known identity")
    return caller


def _same(a: Caller, b: Caller) -> bool:
    return a.host_id == b.host_id if a.is_agent or b.is_agent else a.name == b.name


def authorize(caller: Caller, method: str) -> None:
    """Refused unless `caller` may call `method` at all (namespaces are checked later)."""
    if caller is OPEN_ACCESS:
        return
    needed = RPC_PERMISSIONS.get(method)
    if needed is None:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any caller")
    if needed is Permission.AGENT:
        if not caller.is_agent:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"{caller.describe()} is an API client: only an agent's credential "
                          "opens the agent stream")
        return
    if caller.is_agent:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"an agent's credential ({caller.describe()}) is not an API client")
    if caller.role is None or needed not in ROLE_PERMISSIONS[caller.role]:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"{method.rsplit('/', 1)[-1]} needs the {needed} permission; "
                      f"{caller.describe()} has role {caller.role}")


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def peer_uris(context: grpc.aio.ServicerContext) -> list[str]:
    """The SAN URIs of the caller's certificate, when TLS verified one."""
    values = context.auth_context().get("peer_uri", [])
    return [v.decode(errors="replace") for v in values]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Names the caller of every RPC and refuses what its credential does not allow."""

    def __init__(self, access: Callable[[], Access | None]) -> None:
        self.access = access

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler

        async def admit(context: grpc.aio.ServicerContext) -> None:
            try:
                caller = identify(self.access(), context.invocation_metadata(),
                                  peer_uris(context))
                authorize(caller, method)
            except Refused as refused:
                await context.abort(refused.code, refused.message)
            _caller.set(caller)

        return wrap_handler(handler, admit)


def server_credentials(cert_file: str, key_file: str,
                       client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS with the given certificate (and, with a client CA, required client certificates);
    the files are read again on a handshake after any of them changed."""
    files = [Path(f) for f in (cert_file, key_file, client_ca_file) if f]
    stamps: list[tuple[int, int] | None] = [None]

    def stamp() -> tuple[int, int]:
        stats = [f.stat() for f in files]
        return max(s.st_mtime_ns for s in stats), sum(s.st_ino for s in stats)

    def configuration() -> grpc.ServerCertificateConfiguration:
        stamps[0] = stamp()
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
        client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            if stamp() == stamps[0]:
                return None
            config = configuration()
        except OSError as exc:
            log.error("TLS files not reloaded: %s", exc)
            return None
        log.info("TLS certificate %s reloaded", cert_file)
        return config

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=bool(client_ca_file))
