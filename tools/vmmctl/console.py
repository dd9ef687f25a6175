"""vmmctl's console command: a guest's serial console output (or its hypervisor's log),
once or followed."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from tools.vmmctl.connection import controller, settings
from tools.vmmctl.output import emit_json, note
from tools.vmmctl.vms import VmIdArg
from vmm.v1 import vm_pb2


class Source(StrEnum):
    serial = "serial"
    hypervisor = "hypervisor"


SOURCES = {Source.serial: vm_pb2.CONSOLE_SOURCE_SERIAL,
           Source.hypervisor: vm_pb2.CONSOLE_SOURCE_HYPERVISOR}


def console(
    ctx: typer.Context,
    vm_id: VmIdArg,
    tail: Annotated[int, typer.Option(
        "--tail", min=0, help="Only the last N lines (0: all the agent keeps; with -f, "
                              "lines of history before following).")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new output until Ctrl-C.")] = False,
    source: Annotated[Source, typer.Option(
        "--source", case_sensitive=False,
        help="serial: the guest's console; hypervisor: the hypervisor's own log.",
    )] = Source.serial,
) -> None:
    """Print the guest's serial console output (or the hypervisor's log)."""
    ctl = controller(ctx)
    wanted = SOURCES[source]
    if follow:
        out = sys.stdout.buffer
        for chunk in ctl.stream(ctl.vms.StreamConsole, vm_pb2.StreamConsoleRequest(
                vm_id=vm_id, tail_lines=tail, source=wanted)):
            out.write(chunk.data)
            out.flush()
        return
    response = ctl.call(ctl.vms.GetConsoleLog,
                        vm_pb2.GetConsoleLogRequest(vm_id=vm_id, tail_lines=tail, source=wanted))
    if settings(ctx).json:
        emit_json(response)
        return
    if response.truncated:
        note("(older console output left out)")
    sys.stdout.write(response.text)
    sys.stdout.flush()
