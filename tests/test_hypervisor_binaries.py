"""Which hypervisor binary an agent drives: the one variable naming it, the previous
release's name still honoured with a warning, and test agents that mean the simulators
choosing them even where a real binary is on PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import (
    DEPRECATED_ENV,
    apply_deprecated_environment,
    binary_from_environment,
    load,
)
from tools.fleet.cluster import Cluster
from vmm.v1 import host_pb2


def test_the_agent_reads_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMM_AGENT_FIRECRACKER_BINARY", "/opt/fc/firecracker")
    monkeypatch.delenv("VMM_FIRECRACKER_BINARY", raising=False)
    config = load([])
    assert config.firecracker_binary == "/opt/fc/firecracker"
    assert apply_deprecated_environment(config) == []
    assert binary_from_environment("firecracker") == "/opt/fc/firecracker"


def test_the_previous_name_still_works_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    for old, new in DEPRECATED_ENV.items():  # one warning each: only this one set
        monkeypatch.delenv(old, raising=False)
        monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv("VMM_CLOUD_HYPERVISOR_BINARY", "/usr/local/bin/cloud-hypervisor")
    config = load([])
    [warning] = apply_deprecated_environment(config)
    assert config.cloud_hypervisor_binary == "/usr/local/bin/cloud-hypervisor"
    assert "VMM_CLOUD_HYPERVISOR_BINARY is deprecated" in warning
    assert "VMM_AGENT_CLOUD_HYPERVISOR_BINARY" in warning
    assert binary_from_environment("cloud-hypervisor") == "/usr/local/bin/cloud-hypervisor"
    # The current name wins over the previous one.
    monkeypatch.setenv("VMM_AGENT_CLOUD_HYPERVISOR_BINARY", "/opt/ch/cloud-hypervisor")
    config = load([])
    [warning] = apply_deprecated_environment(config)
    assert config.cloud_hypervisor_binary == "/opt/ch/cloud-hypervisor"
    assert "ignored" in warning


def test_test_agents_drive_the_simulators_even_with_firecracker_on_path(
        cluster: Cluster, tmp_path: Path) -> None:
    # A firecracker on PATH that could not boot the stand-in kernels these agents get.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "firecracker"
    fake.write_text("#!/bin/sh\necho 'Firecracker v1.14.2'\n")
    fake.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster.add_agent("sim", env={"PATH": path})
    [backend] = cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id="sim")).host.backends
    assert backend.simulated and backend.binary_path != str(fake)
