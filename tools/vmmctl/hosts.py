"""vmmctl's host commands: the fleet's hosts and the backends they offer."""

from __future__ import annotations

from typing import Annotated

import typer

from tools.vmmctl import render
from tools.vmmctl.connection import controller, settings
from tools.vmmctl.output import emit_json, note
from vmm.v1 import host_pb2


def hosts(ctx: typer.Context) -> None:
    """List hosts: health, backends, allocation."""
    ctl = controller(ctx)
    response = ctl.call(ctl.hosts.ListHosts, host_pb2.ListHostsRequest())
    if settings(ctx).json:
        emit_json(response)
    elif response.hosts:
        render.stdout_console().print(render.host_table(response.hosts))
    else:
        note("No hosts.")


def host(ctx: typer.Context,
         host_id: Annotated[str, typer.Argument(help="The host's id.")]) -> None:
    """Show one host, with each backend's capabilities."""
    ctl = controller(ctx)
    response = ctl.call(ctl.hosts.GetHost, host_pb2.GetHostRequest(host_id=host_id))
    if settings(ctx).json:
        emit_json(response)
    else:
        render.stdout_console().print(render.host_detail(response.host))


def backends(ctx: typer.Context,
             name: Annotated[str | None, typer.Argument(
                 help="One backend; all the fleet offers when omitted.",
                 show_default=False)] = None) -> None:
    """Show the backend support matrix the hosts declare."""
    ctl = controller(ctx)
    response = ctl.call(ctl.hosts.GetBackendCapabilities,
                        host_pb2.GetBackendCapabilitiesRequest(backend=name or ""))
    if settings(ctx).json:
        emit_json(response)
    elif response.backends:
        render.stdout_console().print(render.capability_matrix(response.backends))
    else:
        note("No backends.")
