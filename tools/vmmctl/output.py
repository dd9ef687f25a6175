"""What vmmctl commands print besides rendered messages: JSON, warnings, notes, summaries."""

from __future__ import annotations

import sys
from typing import Any

import typer
from google.protobuf.message import Message
from rich.text import Text

from tools.vmmctl import render
from tools.vmmctl.connection import settings
from tools.vmmctl.exit_codes import EXIT_SERVER_ERROR


def emit_json(value: Message | dict[str, Any], *, one_line: bool = False) -> None:
    sys.stdout.write(render.to_json(value, one_line=one_line) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    render.stderr_console().print(Text(f"warning: {message}", style="yellow"))


def note(message: str) -> None:
    render.stderr_console().print(Text(message, style="dim"))


def report(ctx: typer.Context, response: Any, summary: Text) -> None:
    """The answer to a state-changing call: the response as JSON, or a summary line.

    Failures arrive as gRPC statuses; success=false without one is still a failure.
    """
    if settings(ctx).json:
        emit_json(response)
    else:
        render.stdout_console().print(summary)
    if not response.success:
        render.stderr_console().print(Text(
            "error: the controller answered without success", style="red"))
        raise typer.Exit(EXIT_SERVER_ERROR)


def state_summary(vm_id: str, verb: str, state: int) -> Text:
    """e.g. "vm-1: paused, state PAUSED"."""
    line = Text(f"{vm_id}: {verb}, state ")
    line.append_text(render.state_text(state))
    return line
