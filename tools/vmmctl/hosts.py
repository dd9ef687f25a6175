"""vmmctl's host commands: the fleet's hosts and the backends they offer."""

from __future__ import annotations

from typing import Annotated

import typer

from tools.vmmctl import paging, render
from tools.vmmctl.connection import controller, settings
from tools.vmmctl.output import emit_json, note
from vmm.v1 import host_pb2


def hosts(
    ctx: typer.Context,
    page_size: Annotated[int, typer.Option(
        "--page-size", min=0, help="Hosts per request; 0 lets the server choose.")] = 0,
    limit: Annotated[int, typer.Option(
        "--limit", min=0, help="Show at most this many hosts; 0 shows them all.")] = 0,
    capabilities: Annotated[bool, typer.Option(
        "--capabilities", help="Include each backend's capabilities (JSON output).")] = False,
) -> None:
    """List hosts: health, backends, allocation."""
    ctl = controller(ctx)

    def fetch(token: str, size: int) -> paging.Page[host_pb2.Host]:
        response = ctl.call(ctl.hosts.ListHosts, host_pb2.ListHostsRequest(
            page_size=size, page_token=token, include_capabilities=capabilities))
        return response.hosts, response.next_page_token, response.total_count

    listing = paging.collect(fetch, page_size=page_size, limit=limit)
    if settings(ctx).json:
        emit_json(host_pb2.ListHostsResponse(hosts=listing.items,
                                             next_page_token=listing.next_page_token,
                                             total_count=listing.total_count))
        return
    if listing.items:
        render.stdout_console().print(render.host_table(listing.items))
    else:
        note("No hosts.")
    if listing.next_page_token:
        note(f"Showing {len(listing.items)} of {listing.total_count or 'more'} hosts; "
             f"all of them without --limit")


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
