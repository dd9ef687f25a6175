"""vmm.common.grpc_io: the controller and the agent choose gRPC's I/O before grpc loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vmm.common.grpc_io import POLL_BASED_IO


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**environment, **env}, check=True, timeout=60)


@pytest.mark.parametrize("entry_point", ["controller.main", "agent.main"])
def test_an_entry_point_chooses_poll_based_io_before_grpc_loads(entry_point: str) -> None:
    result = _run(f"import {entry_point}, os; print(os.environ['GRPC_EXPERIMENTS'])")
    assert result.stdout.strip() == POLL_BASED_IO
    assert "grpc was loaded before" not in result.stderr


def test_the_environment_wins() -> None:
    result = _run("import controller.main, os; print(os.environ['GRPC_EXPERIMENTS'])",
                  GRPC_EXPERIMENTS="event_engine_client")
    assert result.stdout.strip() == "event_engine_client"


def test_too_late_once_grpc_is_loaded() -> None:
    result = _run("import grpc, os\n"
                  "from vmm.common.grpc_io import prefer_poll_based_io\n"
                  "prefer_poll_based_io()\n"
                  "print(os.environ.get('GRPC_EXPERIMENTS', 'unset'))")
    assert result.stdout.strip() == "unset"
    assert "grpc was loaded before its I/O could be chosen" in result.stderr
