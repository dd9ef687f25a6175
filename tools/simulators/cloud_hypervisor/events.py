"""Cloud Hypervisor's event monitor (`--event-monitor path=FILE`): one pretty-printed JSON
object per event followed by a blank line, as event_monitor::event_log writes them, with
the time since the VMM started as {"secs", "nanos"}."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

_started = time.monotonic_ns()
_file: Path | None = None


def set_monitor(option: str | None) -> None:
    """--event-monitor's value: path=FILE (fd=N is not simulated). The file starts empty."""
    global _file
    if not option:
        return
    options = dict(part.split("=", 1) for part in option.split(",") if "=" in part)
    if "path" not in options:
        raise SystemExit("cloud-hypervisor-sim: --event-monitor supports path=FILE only")
    _file = Path(options["path"])
    _file.write_text("")


def event(source: str, name: str, properties: dict[str, str] | None = None) -> None:
    if _file is None:
        return
    elapsed = time.monotonic_ns() - _started
    record: dict[str, Any] = {
        "timestamp": {"secs": elapsed // 1_000_000_000, "nanos": elapsed % 1_000_000_000},
        "source": source, "event": name, "properties": properties}
    with open(_file, "a") as f:
        f.write(json.dumps(record, indent=2) + "\n\n")
