"""vmmctl: the command-line client of the vmm-control-plane API.

Each command is one RPC of vmm.v1.VmService or vmm.v1.HostService. Output is
a table for people or, with `-o json`, the response message in protobuf's JSON
mapping with the .proto's field names, for scripts.

Exit codes: 0 success; 1 the server refused or failed the request; 2 bad usage
or a bad config file; 3 the controller could not be reached.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer._click.core import Context as ClickContext
from typer.core import TyperGroup

from tools.vmmctl import console, hosts, hotplug, vms
from tools.vmmctl.connection import DEFAULT_SERVER, OutputFormat, Settings
from tools.vmmctl.exit_codes import (
    EXIT_INTERRUPTED,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    usage_error,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_SERVER_ERROR", "EXIT_UNREACHABLE", "EXIT_USAGE", "app",
           "main"]


# The output option is global, but kubectl users type it after the command too.
OUTPUT_FLAGS = ("-o", "--output")
# Global options that take a value: what follows them is not the command's name.
GLOBAL_VALUE_OPTIONS = ("--server", "-s", *OUTPUT_FLAGS, "--timeout", "--token", "--ca-cert")


class VmmctlGroup(TyperGroup):
    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_output_option(args))


def hoist_output_option(args: list[str]) -> list[str]:
    """args with each -o/--output given after the command moved before it."""
    hoisted: list[str] = []
    rest: list[str] = []
    seen_command = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if seen_command and arg in OUTPUT_FLAGS and i + 1 < len(args):
            hoisted += args[i:i + 2]
            i += 2
            continue
        if seen_command and (arg.startswith("--output=") or
                             (arg.startswith("-o") and not arg.startswith("--"))):
            hoisted.append(arg)
        else:
            if not arg.startswith("-") and not (rest and rest[-1] in GLOBAL_VALUE_OPTIONS):
                seen_command = True
            rest.append(arg)
        i += 1
    return hoisted + rest


app = typer.Typer(
    name="vmmctl",
    cls=VmmctlGroup,
    help="Manage microVMs and hosts of a vmm-control-plane fleet.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback must never print the token among a frame's locals.
    pretty_exceptions_show_locals=False,
)


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
    client_cert: Annotated[Path | None, typer.Option(
        "--client-cert", envvar="VMM_CLIENT_CERT", show_default=False,
        help="PEM client certificate to present over TLS (with --client-key).",
    )] = None,
    client_key: Annotated[Path | None, typer.Option(
        "--client-key", envvar="VMM_CLIENT_KEY", show_default=False,
        help="PEM private key of --client-cert.",
    )] = None,
    namespace: Annotated[str, typer.Option(
        "--namespace", "-n", envvar="VMM_NAMESPACE",
        help="Namespace to create VMs in and to list and watch (the controller's default: "
             "default); * lists every namespace the credential may read.",
    )] = "",
) -> None:
    if (client_cert is None) != (client_key is None):
        usage_error("--client-cert and --client-key go together")
    ctx.obj = Settings(server=server, output=output, timeout=timeout, token=token or None,
                       ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
                       namespace=namespace)


app.command()(vms.create)
app.command()(vms.get)
app.command("list")(vms.list_vms)
app.command()(vms.boot)
app.command()(vms.pause)
app.command()(vms.resume)
app.command()(vms.reboot)
app.command()(vms.shutdown)
app.command()(vms.delete)
app.command()(vms.watch)
app.command()(hotplug.resize)
app.command("attach-disk")(hotplug.attach_disk)
app.command("detach-disk")(hotplug.detach_disk)
app.command("attach-nic")(hotplug.attach_nic)
app.command("detach-nic")(hotplug.detach_nic)
app.command()(console.console)
app.command()(hosts.hosts)
app.command()(hosts.host)
app.command()(hosts.backends)


def main() -> None:
    try:
        app(prog_name="vmmctl")
    except BrokenPipeError:
        # The reader (head, less) went away; say nothing more to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_SERVER_ERROR)
