"""vmmctl: the command-line client of the vmm-control-plane API.

Each command is one RPC of vmm.v1.VmService or vmm.v1.HostService. Output is
a table for people or, with `-o json`, the response message in protobuf's JSON
mapping with the .proto's field names, for scripts.

Exit codes: 0 success; 1 the server refused or failed the request; 2 bad usage
or a bad config file; 3 the controller could not be reached.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.text import Text

from tools import vmmctl_render as render
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc

EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "127.0.0.1:50051"
# How long to wait, after a failed call, for the channel to say whether it can connect.
REACHABILITY_PROBE_SECONDS = 2.0
# Extra deadline for a graceful shutdown beyond the time the guest is given.
SHUTDOWN_DEADLINE_MARGIN_SECONDS = 10.0

Response = TypeVar("Response", bound=Message)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


class StateName(StrEnum):
    """VM states as typed on the command line."""

    created = "created"
    running = "running"
    paused = "paused"
    shutdown = "shutdown"
    failed = "failed"
    unknown = "unknown"

    def to_proto(self) -> vm_pb2.VmState.ValueType:
        return _STATE_VALUES[self]


_STATE_VALUES: dict[StateName, vm_pb2.VmState.ValueType] = {
    StateName.created: vm_pb2.VM_STATE_CREATED,
    StateName.running: vm_pb2.VM_STATE_RUNNING,
    StateName.paused: vm_pb2.VM_STATE_PAUSED,
    StateName.shutdown: vm_pb2.VM_STATE_SHUTDOWN,
    StateName.failed: vm_pb2.VM_STATE_FAILED,
    StateName.unknown: vm_pb2.VM_STATE_UNKNOWN,
}


# ---------------------------------------------------------------- input parsing

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40,
}


def parse_memory_size(text: str) -> int:
    """Bytes from "1073741824", "512MiB", "2GiB", "1.5GiB" or QEMU-style "512M".

    Units are binary. "MB"/"GB" are refused rather than guessed: a decimal
    megabyte is not a size any hypervisor here accepts for guest memory.
    """
    match = _SIZE_PATTERN.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 512MiB, 2GiB or a byte count")
    number, unit = match.group(1), match.group(2).lower()
    if unit not in _SIZE_UNITS:
        hint = f" (did you mean {number}{unit[0].upper()}iB?)" if unit[:1] in "kmgt" else ""
        raise ValueError(f"unknown size unit {match.group(2)!r}{hint}; use KiB, MiB, GiB or TiB")
    try:
        size = Decimal(number) * _SIZE_UNITS[unit]
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"{text!r} is not a size") from exc
    if size != size.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    if size <= 0:
        raise ValueError("a memory size must be greater than zero")
    return int(size)


def _memory_size_option(text: str) -> int:
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _unknown_field(data: Any, descriptor: Descriptor, path: str) -> str | None:
    """The first JSON key with no field in the message, as a path and the valid names.

    protobuf's own error names the camelCase JSON names; people writing the
    spec's snake_case JSON need the path they wrote and the names they may use.
    """
    if not isinstance(data, dict):
        return None  # wrong shapes are left to ParseDict, which names them well enough
    for key, value in data.items():
        fd = descriptor.fields_by_name.get(key) or _field_by_json_name(descriptor, key)
        where = f"{path}.{key}" if path else key
        if fd is None:
            known = ", ".join(f.name for f in descriptor.fields)
            return f'unknown field "{where}"; {descriptor.name} has: {known}'
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        # A list is a repeated field's elements; a list in the wrong place is ParseDict's to name.
        if isinstance(value, list):
            elements = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
        else:
            elements = [(where, value)]
        for element_path, element in elements:
            problem = _unknown_field(element, fd.message_type, element_path)
            if problem:
                return problem
    return None


def _field_by_json_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    return next((f for f in descriptor.fields if f.json_name == name), None)


def _parse_error_text(error: json_format.ParseError) -> str:
    """ "Failed to parse config field: Failed to parse cpu field: X" as "config.cpu: X"."""
    text = str(error)
    path: list[str] = []
    while match := re.match(r"Failed to parse (\w+) field: ", text):
        path.append(match.group(1))
        text = text[match.end():]
    text = text.rstrip(".")
    return f"{'.'.join(path)}: {text}" if path else text


class ConfigFileError(ValueError):
    """A VM config file that cannot be read or does not describe a VmConfig."""


def load_create_request(path: str) -> vm_pb2.CreateVmRequest:
    """A CreateVmRequest from a JSON file ("-" is stdin).

    The file is either the spec's shape, {"config": {...}} (optionally with
    vm_id, backend, host_id beside it), or a bare VmConfig object. Raises
    ConfigFileError naming the file and the offending field.
    """
    source = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read {source}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}, "
                              f"column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{source}: expected a JSON object")

    wrapped = "config" in data
    request = vm_pb2.CreateVmRequest()
    target: Message = request if wrapped else request.config
    problem = _unknown_field(data, cast(Descriptor, target.DESCRIPTOR), "")
    if problem is None:
        try:
            json_format.ParseDict(data, target)
        except json_format.ParseError as exc:
            problem = _parse_error_text(exc)
    if problem:
        raise ConfigFileError(f"{source}: {problem}")
    return request


# ---------------------------------------------------------------- talking to the controller


@dataclass
class Settings:
    server: str
    output: OutputFormat
    timeout: float
    token: str | None = field(default=None, repr=False)
    ca_cert: Path | None = None

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
        if settings.ca_cert is None:
            return grpc.insecure_channel(settings.server)
        try:
            root = settings.ca_cert.read_bytes()
        except OSError as exc:
            _usage_error(f"cannot read CA certificate {settings.ca_cert}: {exc.strerror}")
        return grpc.secure_channel(settings.server, grpc.ssl_channel_credentials(root))

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


def _usage_error(message: str) -> NoReturn:
    render.stderr_console().print(Text(f"error: {message}", style="red"))
    raise typer.Exit(EXIT_USAGE)


def _controller(ctx: typer.Context) -> Controller:
    """A connection for this command, closed when the command ends."""
    controller = Controller(_settings(ctx))
    ctx.call_on_close(controller.close)
    return controller


def _settings(ctx: typer.Context) -> Settings:
    return cast(Settings, ctx.obj)


# ---------------------------------------------------------------- output helpers


def _emit_json(value: Message | dict[str, Any], *, one_line: bool = False) -> None:
    sys.stdout.write(render.to_json(value, one_line=one_line) + "\n")
    sys.stdout.flush()


def _warn(message: str) -> None:
    render.stderr_console().print(Text(f"warning: {message}", style="yellow"))


def _note(message: str) -> None:
    render.stderr_console().print(Text(message, style="dim"))


def _report(ctx: typer.Context, response: Any, summary: Text) -> None:
    """The answer to a state-changing call: the response as JSON, or a summary line.

    Failures arrive as gRPC statuses; success=false without one is still a failure.
    """
    if _settings(ctx).json:
        _emit_json(response)
    else:
        render.stdout_console().print(summary)
    if not response.success:
        render.stderr_console().print(Text(
            "error: the controller answered without success", style="red"))
        raise typer.Exit(EXIT_SERVER_ERROR)


def _state_summary(vm_id: str, verb: str, state: int) -> Text:
    """e.g. "vm-1: paused, state PAUSED"."""
    line = Text(f"{vm_id}: {verb}, state ")
    line.append_text(render.state_text(state))
    return line


# ---------------------------------------------------------------- the commands

app = typer.Typer(
    name="vmmctl",
    help="Manage microVMs and hosts of a vmm-control-plane fleet.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback must never print the token among a frame's locals.
    pretty_exceptions_show_locals=False,
)

VmIdArg = Annotated[str, typer.Argument(help="The VM's id.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Do not wait for the guest.")]


@app.callback()
def _global_options(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(
        "--server", "-s", envvar="VMM_SERVER", help="Controller address, host:port.",
    )] = DEFAULT_SERVER,
    output: Annotated[OutputFormat, typer.Option(
        "--output", "-o", case_sensitive=False, help="table for people, json for scripts.",
    )] = OutputFormat.table,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Deadline of each call, in seconds.",
    )] = 30.0,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="VMM_TOKEN", show_default=False,
        help="Bearer token sent in the authorization metadata.",
    )] = None,
    ca_cert: Annotated[Path | None, typer.Option(
        "--ca-cert", envvar="VMM_CA_CERT", show_default=False,
        help="PEM CA bundle; connects with TLS when given.",
    )] = None,
) -> None:
    ctx.obj = Settings(server=server, output=output, timeout=timeout, token=token or None,
                       ca_cert=ca_cert)


@app.command()
def create(
    ctx: typer.Context,
    file: Annotated[str, typer.Option(
        "--file", "-f", show_default=False,
        help='JSON file: {"config": {...}} or a bare VmConfig; - reads stdin.',
    )],
    vm_id: Annotated[str | None, typer.Option(
        "--id", help="The VM's id; the controller picks one when omitted.")] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="firecracker, cloud-hypervisor or qemu; the scheduler picks one "
                          "when omitted.")] = None,
    host: Annotated[str | None, typer.Option(
        "--host", help="Pin the VM to this host.")] = None,
) -> None:
    """Create a VM from a config file."""
    try:
        request = load_create_request(file)
    except ConfigFileError as exc:
        _usage_error(str(exc))
    if vm_id is not None:
        request.vm_id = vm_id
    if backend is not None:
        request.backend = backend
    if host is not None:
        request.host_id = host
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.CreateVm, request)
    for warning in response.warnings:
        _warn(warning)
    if _settings(ctx).json:
        _emit_json(response)
        return
    line = Text(f"{response.vm_id}: created, state ")
    line.append_text(render.state_text(response.state))
    line.append(f", {render.placement_text(response.placement)}")
    render.stdout_console().print(line)


@app.command()
def get(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Show one VM: state, placement, config, metrics."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.GetVmInfo, vm_pb2.GetVmInfoRequest(vm_id=vm_id))
    if _settings(ctx).json:
        _emit_json(response)
    else:
        render.stdout_console().print(render.vm_detail(response))


@app.command("list")
def list_vms(
    ctx: typer.Context,
    state: Annotated[list[StateName] | None, typer.Option(
        "--state", case_sensitive=False, show_default=False,
        help="Only VMs in this state; repeat for several.")] = None,
    page_size: Annotated[int, typer.Option(
        "--page-size", min=0, help="VMs per page; 0 lets the server choose.")] = 0,
    page_token: Annotated[str, typer.Option(
        "--page-token", help="Continue a listing from this token.")] = "",
    all_pages: Annotated[bool, typer.Option(
        "--all", "-A", help="Follow next_page_token until the last page.")] = False,
) -> None:
    """List VMs."""
    ctl = _controller(ctx)
    request = vm_pb2.ListVmsRequest(
        state_filter=[s.to_proto() for s in state or ()], page_size=page_size,
        page_token=page_token)
    vms: list[vm_pb2.VmInfo] = []
    seen_tokens: set[str] = set()
    while True:
        response = ctl.call(ctl.vms.ListVms, request)
        vms.extend(response.vms)
        token = response.next_page_token
        if not all_pages or not token:
            break
        if token in seen_tokens:  # a server bug would otherwise loop forever
            _note(f"the server repeated page token {token!r}; stopping")
            break
        seen_tokens.add(token)
        request.page_token = token

    if _settings(ctx).json:
        combined = vm_pb2.ListVmsResponse(vms=vms, next_page_token=token,
                                          total_count=response.total_count)
        _emit_json(combined)
        return
    if vms:
        render.stdout_console().print(render.vm_table(vms))
    else:
        _note("No VMs.")
    if token:
        _note(f"Showing {len(vms)} of {response.total_count or 'more'} VMs; the rest with "
              f"--all or --page-token {token}")


@app.command()
def boot(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Boot a VM (also restarts a failed or shut down one)."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.BootVm, vm_pb2.BootVmRequest(vm_id=vm_id))
    _report(ctx, response, _state_summary(vm_id, "booted", response.state))


@app.command()
def pause(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Pause a running VM."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.PauseVm, vm_pb2.PauseVmRequest(vm_id=vm_id))
    _report(ctx, response, _state_summary(vm_id, "paused", response.state))


@app.command()
def resume(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Resume a paused VM."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.ResumeVm, vm_pb2.ResumeVmRequest(vm_id=vm_id))
    _report(ctx, response, _state_summary(vm_id, "resumed", response.state))


@app.command()
def reboot(ctx: typer.Context, vm_id: VmIdArg, force: ForceOpt = False) -> None:
    """Reboot a VM."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.RebootVm, vm_pb2.RebootVmRequest(vm_id=vm_id, force=force))
    _report(ctx, response, _state_summary(vm_id, "rebooted", response.state))


@app.command()
def shutdown(
    ctx: typer.Context,
    vm_id: VmIdArg,
    force: ForceOpt = False,
    grace: Annotated[int, typer.Option(
        "--timeout", min=0, help="Seconds the guest gets to power off; 0 lets the "
                                 "server choose.")] = 0,
) -> None:
    """Shut a VM down."""
    ctl = _controller(ctx)
    # The call has to outlive the guest's grace period.
    deadline = max(ctl.settings.timeout, grace + SHUTDOWN_DEADLINE_MARGIN_SECONDS)
    response = ctl.call(ctl.vms.ShutdownVm, vm_pb2.ShutdownVmRequest(
        vm_id=vm_id, force=force, timeout_seconds=grace), timeout=deadline)
    _report(ctx, response, _state_summary(vm_id, "shut down", response.state))


@app.command()
def delete(ctx: typer.Context, vm_id: VmIdArg,
           force: Annotated[bool, typer.Option(
               "--force", help="Delete even if the VM is running.")] = False) -> None:
    """Delete a VM."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.DeleteVm, vm_pb2.DeleteVmRequest(vm_id=vm_id, force=force))
    _report(ctx, response, Text(f"{vm_id}: deleted"))


@app.command()
def watch(
    ctx: typer.Context,
    vm_ids: Annotated[list[str] | None, typer.Argument(
        help="VMs to watch; none watches every VM.", show_default=False)] = None,
    state: Annotated[list[StateName] | None, typer.Option(
        "--state", case_sensitive=False, show_default=False,
        help="Only VMs in this state; repeat for several.")] = None,
) -> None:
    """Print VM changes as they happen, one line each, until Ctrl-C."""
    ctl = _controller(ctx)
    request = vm_pb2.WatchVmsRequest(vm_ids=vm_ids or [],
                                     state_filter=[s.to_proto() for s in state or ()])
    as_json = _settings(ctx).json
    for event in ctl.stream(ctl.vms.WatchVms, request):
        if as_json:
            _emit_json(event, one_line=True)
        else:
            sys.stdout.write(render.watch_line(event) + "\n")
            sys.stdout.flush()


@app.command()
def resize(
    ctx: typer.Context,
    vm_id: VmIdArg,
    vcpus: Annotated[int | None, typer.Option("--vcpus", min=1, show_default=False,
                                              help="New vCPU count.")] = None,
    memory: Annotated[int | None, typer.Option(
        "--memory", parser=_memory_size_option, metavar="SIZE", show_default=False,
        help="New memory size: 2GiB, 512MiB or bytes.")] = None,
) -> None:
    """Change a running VM's vCPUs or memory (hotplug)."""
    if vcpus is None and memory is None:
        raise typer.BadParameter("give at least one of them", param_hint="'--vcpus' / '--memory'")
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.ResizeVm, vm_pb2.ResizeVmRequest(
        vm_id=vm_id, vcpu_count=vcpus or 0, memory_size_bytes=memory or 0))
    _report(ctx, response, Text(
        f"{vm_id}: resized to {response.vcpu_count} vCPUs, "
        f"{render.format_bytes(response.memory_size_bytes)}"))


@app.command("attach-disk")
def attach_disk(
    ctx: typer.Context,
    vm_id: VmIdArg,
    path: Annotated[str, typer.Option("--path", show_default=False,
                                      help="Disk image or block device on the host.")],
    disk_id: Annotated[str, typer.Option("--id", help="Device id; the server picks one "
                                                      "when omitted.")] = "",
    read_only: Annotated[bool, typer.Option("--read-only")] = False,
) -> None:
    """Hotplug a disk into a running VM."""
    ctl = _controller(ctx)
    device = vm_pb2.StorageDevice(id=disk_id, path=path, read_only=read_only)
    response = ctl.call(ctl.vms.AttachDisk, vm_pb2.AttachDiskRequest(vm_id=vm_id, device=device))
    _report(ctx, response, _state_summary(vm_id, f"attached disk {disk_id or path}",
                                          response.state))


@app.command("detach-disk")
def detach_disk(ctx: typer.Context, vm_id: VmIdArg,
                disk_id: Annotated[str, typer.Argument(help="The disk's id.")]) -> None:
    """Unplug a disk from a running VM."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.DetachDisk,
                        vm_pb2.DetachDiskRequest(vm_id=vm_id, device_id=disk_id))
    _report(ctx, response, _state_summary(vm_id, f"detached disk {disk_id}", response.state))


@app.command("attach-nic")
def attach_nic(
    ctx: typer.Context,
    vm_id: VmIdArg,
    tap: Annotated[str, typer.Option("--tap", show_default=False, help="TAP device name.")],
    nic_id: Annotated[str, typer.Option("--id", help="Interface id; the server picks one "
                                                     "when omitted.")] = "",
    mac: Annotated[str, typer.Option("--mac", help="Guest MAC address.")] = "",
) -> None:
    """Hotplug a network interface into a running VM."""
    ctl = _controller(ctx)
    nic = vm_pb2.NetworkInterface(id=nic_id, tap_device=tap, mac_address=mac)
    response = ctl.call(ctl.vms.AttachNetworkInterface,
                        vm_pb2.AttachNetworkInterfaceRequest(vm_id=vm_id, interface=nic))
    _report(ctx, response, _state_summary(vm_id, f"attached interface {nic_id or tap}",
                                          response.state))


@app.command("detach-nic")
def detach_nic(ctx: typer.Context, vm_id: VmIdArg,
               nic_id: Annotated[str, typer.Argument(help="The interface's id.")]) -> None:
    """Unplug a network interface from a running VM."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.vms.DetachNetworkInterface,
                        vm_pb2.DetachNetworkInterfaceRequest(vm_id=vm_id, interface_id=nic_id))
    _report(ctx, response, _state_summary(vm_id, f"detached interface {nic_id}",
                                          response.state))


@app.command()
def console(
    ctx: typer.Context,
    vm_id: VmIdArg,
    tail: Annotated[int, typer.Option(
        "--tail", min=0, help="Only the last N lines (0: all the agent keeps; with -f, "
                              "lines of history before following).")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new output until Ctrl-C.")] = False,
) -> None:
    """Print the guest's serial console output."""
    ctl = _controller(ctx)
    if follow:
        out = sys.stdout.buffer
        for chunk in ctl.stream(ctl.vms.StreamConsole,
                                vm_pb2.StreamConsoleRequest(vm_id=vm_id, tail_lines=tail)):
            out.write(chunk.data)
            out.flush()
        return
    response = ctl.call(ctl.vms.GetConsoleLog,
                        vm_pb2.GetConsoleLogRequest(vm_id=vm_id, tail_lines=tail))
    if _settings(ctx).json:
        _emit_json(response)
        return
    if response.truncated:
        _note("(older console output left out)")
    sys.stdout.write(response.text)
    sys.stdout.flush()


@app.command()
def hosts(ctx: typer.Context) -> None:
    """List hosts: health, backends, allocation."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.hosts.ListHosts, host_pb2.ListHostsRequest())
    if _settings(ctx).json:
        _emit_json(response)
    elif response.hosts:
        render.stdout_console().print(render.host_table(response.hosts))
    else:
        _note("No hosts.")


@app.command()
def host(ctx: typer.Context,
         host_id: Annotated[str, typer.Argument(help="The host's id.")]) -> None:
    """Show one host, with each backend's capabilities."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.hosts.GetHost, host_pb2.GetHostRequest(host_id=host_id))
    if _settings(ctx).json:
        _emit_json(response)
    else:
        render.stdout_console().print(render.host_detail(response.host))


@app.command()
def backends(ctx: typer.Context,
             name: Annotated[str | None, typer.Argument(
                 help="One backend; all the fleet offers when omitted.",
                 show_default=False)] = None) -> None:
    """Show the backend support matrix the hosts declare."""
    ctl = _controller(ctx)
    response = ctl.call(ctl.hosts.GetBackendCapabilities,
                        host_pb2.GetBackendCapabilitiesRequest(backend=name or ""))
    if _settings(ctx).json:
        _emit_json(response)
    elif response.backends:
        render.stdout_console().print(render.capability_matrix(response.backends))
    else:
        _note("No backends.")


def main() -> None:
    try:
        app(prog_name="vmmctl")
    except BrokenPipeError:
        # The reader (head, less) went away; say nothing more to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_SERVER_ERROR)


if __name__ == "__main__":
    main()
