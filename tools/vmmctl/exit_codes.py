"""vmmctl's exit codes, and the usage error that ends a command with one."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.text import Text

from tools.vmmctl import render

EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


def usage_error(message: str) -> NoReturn:
    render.stderr_console().print(Text(f"error: {message}", style="red"))
    raise typer.Exit(EXIT_USAGE)
