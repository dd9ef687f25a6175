"""vmmctl's console command: a guest's serial console output, once or followed."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tools.vmmctl.connection import controller, settings
from tools.vmmctl.output import emit_json, note
from tools.vmmctl.vms import VmIdArg
from vmm.v1 import vm_pb2


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
    ctl = controller(ctx)
    if follow:
        out = sys.stdout.buffer
        for chunk in ctl.stream(ctl.vms.StreamConsole,
                                vm_pb2.StreamConsoleRequest(vm_id=vm_id, tail_lines=tail)):
            out.write(chunk.data)
            out.flush()
        return
    response = ctl.call(ctl.vms.GetConsoleLog,
                        vm_pb2.GetConsoleLogRequest(vm_id=vm_id, tail_lines=tail))
    if settings(ctx).json:
        emit_json(response)
        return
    if response.truncated:
        note("(older console output left out)")
    sys.stdout.write(response.text)
    sys.stdout.flush()
