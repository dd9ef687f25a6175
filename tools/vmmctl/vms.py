"""vmmctl's VM commands: create, inspect, list and watch VMs, and change their power state."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.text import Text

from tools.vmmctl import paging, render
from tools.vmmctl.connection import controller, settings
from tools.vmmctl.exit_codes import usage_error
from tools.vmmctl.inputs import ConfigFileError, load_create_request
from tools.vmmctl.output import emit_json, note, report, state_summary, warn
from vmm.v1 import vm_pb2

# Extra deadline for a graceful shutdown beyond the time the guest is given.
SHUTDOWN_DEADLINE_MARGIN_SECONDS = 10.0

VmIdArg = Annotated[str, typer.Argument(help="The VM's id.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Do not wait for the guest.")]


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
        usage_error(str(exc))
    if vm_id is not None:
        request.vm_id = vm_id
    if backend is not None:
        request.backend = backend
    if host is not None:
        request.host_id = host
    if not request.namespace:
        request.namespace = settings(ctx).namespace
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.CreateVm, request)
    for warning in response.warnings:
        warn(warning)
    if settings(ctx).json:
        emit_json(response)
        return
    line = Text(f"{response.vm_id}: created, state ")
    line.append_text(render.state_text(response.state))
    line.append(f", {render.placement_text(response.placement)}")
    render.stdout_console().print(line)


def get(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Show one VM: state, placement, config, metrics."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.GetVmInfo, vm_pb2.GetVmInfoRequest(vm_id=vm_id))
    if settings(ctx).json:
        emit_json(response)
    else:
        render.stdout_console().print(render.vm_detail(response))


def list_vms(
    ctx: typer.Context,
    state: Annotated[list[StateName] | None, typer.Option(
        "--state", case_sensitive=False, show_default=False,
        help="Only VMs in this state; repeat for several.")] = None,
    page_size: Annotated[int, typer.Option(
        "--page-size", min=0, help="VMs per page; 0 lets the server choose. With "
                                   "--page-size or --page-token alone, one page is shown."
    )] = 0,
    page_token: Annotated[str, typer.Option(
        "--page-token", help="Continue a listing from this token.")] = "",
    all_pages: Annotated[bool, typer.Option(
        "--all", "-A", help="Follow next_page_token until the last page.")] = False,
    limit: Annotated[int, typer.Option(
        "--limit", min=0, help="Show at most this many VMs, following pages; 0: no limit."
    )] = 0,
) -> None:
    """List VMs, following every page unless paging options ask for one."""
    ctl = controller(ctx)
    states = [s.to_proto() for s in state or ()]

    def fetch(token: str, size: int) -> paging.Page[vm_pb2.VmInfo]:
        response = ctl.call(ctl.vms.ListVms, vm_pb2.ListVmsRequest(
            state_filter=states, page_size=size, page_token=token,
            namespace=settings(ctx).namespace))
        return response.vms, response.next_page_token, response.total_count

    one_page = not all_pages and not limit and bool(page_size or page_token)
    listing = paging.collect(fetch, page_size=page_size, page_token=page_token, limit=limit,
                             follow=not one_page)
    vms, token = listing.items, listing.next_page_token
    if settings(ctx).json:
        emit_json(vm_pb2.ListVmsResponse(vms=vms, next_page_token=token,
                                         total_count=listing.total_count))
        return
    if vms:
        render.stdout_console().print(render.vm_table(vms))
    else:
        note("No VMs.")
    if token:
        note(f"Showing {len(vms)} of {listing.total_count or 'more'} VMs; the rest with "
             f"--all or --page-token {token}")


def boot(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Boot a VM (also restarts a failed or shut down one)."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.BootVm, vm_pb2.BootVmRequest(vm_id=vm_id))
    report(ctx, response, state_summary(vm_id, "booted", response.state))


def pause(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Pause a running VM."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.PauseVm, vm_pb2.PauseVmRequest(vm_id=vm_id))
    report(ctx, response, state_summary(vm_id, "paused", response.state))


def resume(ctx: typer.Context, vm_id: VmIdArg) -> None:
    """Resume a paused VM."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.ResumeVm, vm_pb2.ResumeVmRequest(vm_id=vm_id))
    report(ctx, response, state_summary(vm_id, "resumed", response.state))


def reboot(ctx: typer.Context, vm_id: VmIdArg, force: ForceOpt = False) -> None:
    """Reboot a VM."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.RebootVm, vm_pb2.RebootVmRequest(vm_id=vm_id, force=force))
    report(ctx, response, state_summary(vm_id, "rebooted", response.state))


def shutdown(
    ctx: typer.Context,
    vm_id: VmIdArg,
    force: ForceOpt = False,
    grace: Annotated[int, typer.Option(
        "--timeout", min=0, help="Seconds the guest gets to power off; 0 lets the "
                                 "server choose.")] = 0,
) -> None:
    """Shut a VM down."""
    ctl = controller(ctx)
    # The call has to outlive the guest's grace period.
    deadline = max(ctl.settings.timeout, grace + SHUTDOWN_DEADLINE_MARGIN_SECONDS)
    response = ctl.call(ctl.vms.ShutdownVm, vm_pb2.ShutdownVmRequest(
        vm_id=vm_id, force=force, timeout_seconds=grace), timeout=deadline)
    report(ctx, response, state_summary(vm_id, "shut down", response.state))


def delete(ctx: typer.Context, vm_id: VmIdArg,
           force: Annotated[bool, typer.Option(
               "--force", help="Delete even if the VM is running.")] = False) -> None:
    """Delete a VM."""
    ctl = controller(ctx)
    response = ctl.call(ctl.vms.DeleteVm, vm_pb2.DeleteVmRequest(vm_id=vm_id, force=force))
    report(ctx, response, Text(f"{vm_id}: deleted"))


def watch(
    ctx: typer.Context,
    vm_ids: Annotated[list[str] | None, typer.Argument(
        help="VMs to watch; none watches every VM.", show_default=False)] = None,
    state: Annotated[list[StateName] | None, typer.Option(
        "--state", case_sensitive=False, show_default=False,
        help="Only VMs in this state; repeat for several.")] = None,
) -> None:
    """Print VM changes as they happen, one line each, until Ctrl-C."""
    ctl = controller(ctx)
    request = vm_pb2.WatchVmsRequest(vm_ids=vm_ids or [],
                                     state_filter=[s.to_proto() for s in state or ()],
                                     namespace=settings(ctx).namespace)
    as_json = settings(ctx).json
    for event in ctl.stream(ctl.vms.WatchVms, request):
        if as_json:
            emit_json(event, one_line=True)
        else:
            sys.stdout.write(render.watch_line(event) + "\n")
            sys.stdout.flush()
