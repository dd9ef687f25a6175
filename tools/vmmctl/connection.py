"""vmmctl's connection to the controller: settings, credentials, calls and their failures."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NoReturn, TypeVar, cast

import grpc
import typer
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.text import Text

from tools.vmmctl import render
from tools.vmmctl.exit_codes import (
    EXIT_INTERRUPTED,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    usage_error,
)
from vmm.v1 import host_pb2_grpc, vm_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
# How long to wait, after a failed call, for the channel to say whether it can connect.
REACHABILITY_PROBE_SECONDS = 2.0

Response = TypeVar("Response", bound=Message)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


@dataclass
class Settings:
    server: str
    output: OutputFormat
    timeout: float
    token: str | None = field(default=None, repr=False)
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # Empty: the controller's default namespace.
    namespace: str = ""

    @property
    def json(self) -> bool:
        return self.output is OutputFormat.json


class Controller:
    """One channel to the controller, with the calls vmmctl makes on it.

    Every call either returns the response or reports the failure on stderr
    and raises typer.Exit with vmmctl's exit code for it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel = self._open_channel(settings)
        self.vms = vm_pb2_grpc.VmServiceStub(self.channel)
        self.hosts = host_pb2_grpc.HostServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {settings.token}"),) if settings.token else ()
        )

    @staticmethod
    def _open_channel(settings: Settings) -> grpc.Channel:
        if settings.ca_cert is None and settings.client_cert is None:
            return grpc.insecure_channel(settings.server)
        root = _read(settings.ca_cert, "CA certificate")
        cert = _read(settings.client_cert, "client certificate")
        key = _read(settings.client_key, "client key")
        return grpc.secure_channel(settings.server, grpc.ssl_channel_credentials(
            root, private_key=key, certificate_chain=cert))

    def close(self) -> None:
        self.channel.close()

    def call(self, rpc: Callable[..., Response], request: Message,
             timeout: float | None = None) -> Response:
        try:
            return rpc(request, timeout=timeout or self.settings.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self.fail(exc)

    def stream(self, rpc: Callable[..., Iterator[Response]],
               request: Message) -> Iterator[Response]:
        """The responses of a server stream, with no deadline; Ctrl-C cancels it."""
        responses = rpc(request, metadata=self.metadata)
        try:
            yield from responses
        except grpc.RpcError as exc:
            self.fail(exc)
        except KeyboardInterrupt:
            cast(grpc.Call, responses).cancel()
            raise typer.Exit(EXIT_INTERRUPTED) from None

    def fail(self, exc: grpc.RpcError) -> NoReturn:
        call = cast(grpc.Call, exc)
        code, details = call.code(), call.details() or ""
        err = render.stderr_console()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                and not self._connectable():
            err.print(Text(
                f"error: cannot reach the controller at {self.settings.server}: {details}",
                style="red"))
            raise typer.Exit(EXIT_UNREACHABLE)
        lines = status_detail_lines(call)
        # The controller's message often just joins its violations; list each once.
        redundant = bool(lines) and all(line in details for line in lines)
        header = f"error: {code.name}" if redundant else f"error: {code.name}: {details}"
        err.print(Text(header, style="red"))
        for line in lines:
            err.print(Text(f"  {line}"))
        raise typer.Exit(EXIT_SERVER_ERROR)

    def _connectable(self) -> bool:
        """Whether the channel can connect: tells a server's UNAVAILABLE from no server.

        A call made without wait_for_ready fails at once when nothing listens;
        the channel then sits in TRANSIENT_FAILURE. If it is READY, the status
        came from the controller itself (e.g. its etcd is down).
        """
        settled = threading.Event()
        connected = threading.Event()

        def on_change(state: grpc.ChannelConnectivity) -> None:
            if state is grpc.ChannelConnectivity.READY:
                connected.set()
                settled.set()
            elif state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                           grpc.ChannelConnectivity.SHUTDOWN):
                settled.set()

        self.channel.subscribe(on_change, try_to_connect=True)
        try:
            settled.wait(REACHABILITY_PROBE_SECONDS)
        finally:
            self.channel.unsubscribe(on_change)
        return connected.is_set()


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        usage_error(f"cannot read {what} {path}: {exc.strerror}")


def status_detail_lines(call: grpc.Call) -> list[str]:
    """The google.rpc error details a status carries, one line per violation."""
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # details that contradict the status itself: show none
        return []
    if status is None:
        return []
    lines: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines += [f"{v.field}: {v.description}" for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            lines += [f"{v.subject or v.type}: {v.description}" for v in failure.violations]
    return lines


def controller(ctx: typer.Context) -> Controller:
    """A connection for this command, closed when the command ends."""
    ctl = Controller(settings(ctx))
    ctx.call_on_close(ctl.close)
    return ctl


def settings(ctx: typer.Context) -> Settings:
    return cast(Settings, ctx.obj)
