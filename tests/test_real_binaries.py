"""The whole system against a real Firecracker or Cloud Hypervisor binary, where one is
installed: the agent registers the backend as real, and a tiny guest boots under KVM."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import binary_from_environment
from tools.fleet.cluster import Cluster
from tools.guests import images as guest_images
from vmm.v1 import host_pb2, vm_pb2


def real_binary(backend: str) -> str | None:
    return binary_from_environment(backend) or shutil.which(backend)


FIRECRACKER = real_binary("firecracker")
CLOUD_HYPERVISOR = real_binary("cloud-hypervisor")
KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture
def short_cluster() -> Iterator[Cluster]:
    # A short work dir: hypervisors' API socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="vmm-real-") as tmp:
        c = Cluster(Path(tmp))
        try:
            c.start()
            yield c
        finally:
            c.close()


def tiny_config(kernel: Path) -> vm_pb2.VmConfig:
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count = 1
    config.memory.size_bytes = 128 << 20
    config.boot.kernel_path = str(kernel)
    config.boot.kernel_args = "console=ttyS0"
    config.boot.boot_options["ready_marker"] = guest_images.TINY_GUEST_MARKER
    return config


@pytest.mark.skipif(FIRECRACKER is None, reason="no firecracker binary: set "
                    "VMM_AGENT_FIRECRACKER_BINARY or put firecracker on PATH")
@pytest.mark.skipif(not KVM, reason="no usable /dev/kvm for Firecracker")
def test_firecracker_binary_boots_the_tiny_guest_through_the_control_plane(
        short_cluster: Cluster) -> None:
    guest = guest_images.tiny_guest(guest_images.default_cache_dir())
    short_cluster.add_agent("real", backends="firecracker", simulated=False,
                            extra=["--firecracker-binary", str(FIRECRACKER)])
    host = short_cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id="real")).host
    assert [(b.name, b.simulated) for b in host.backends] == [("firecracker", False)]

    vms = short_cluster.vms
    created = vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="tiny", config=tiny_config(guest.elf64)))
    assert not created.placement.simulated
    assert vms.BootVm(vm_pb2.BootVmRequest(vm_id="tiny")).state == vm_pb2.VM_STATE_RUNNING
    console = vms.GetConsoleLog(vm_pb2.GetConsoleLogRequest(vm_id="tiny")).text
    assert guest_images.TINY_GUEST_MARKER in console
    assert vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="tiny")).state == vm_pb2.VM_STATE_PAUSED
    assert vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="tiny")).state == vm_pb2.VM_STATE_RUNNING
    # The tiny guest has no keyboard driver: Ctrl+Alt+Del goes unanswered and the
    # process is stopped after the timeout, as the spec's "force only" says.
    down = vms.ShutdownVm(vm_pb2.ShutdownVmRequest(vm_id="tiny", timeout_seconds=1))
    assert down.state == vm_pb2.VM_STATE_SHUTDOWN
    assert vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="tiny")).success


@pytest.mark.skipif(CLOUD_HYPERVISOR is None, reason="no cloud-hypervisor binary: set "
                    "VMM_AGENT_CLOUD_HYPERVISOR_BINARY or put cloud-hypervisor on PATH")
@pytest.mark.skipif(not KVM, reason="no usable /dev/kvm for Cloud Hypervisor")
def test_cloud_hypervisor_binary_boots_the_tiny_guest_through_the_control_plane(
        short_cluster: Cluster) -> None:
    guest = guest_images.tiny_guest(guest_images.default_cache_dir())
    short_cluster.add_agent("real", backends="cloud-hypervisor", simulated=False,
                            extra=["--cloud-hypervisor-binary", str(CLOUD_HYPERVISOR)])
    config = tiny_config(guest.pvh32)
    config.memory.size_bytes = 512 << 20
    vms = short_cluster.vms
    created = vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="tiny", config=config))
    assert not created.placement.simulated
    assert vms.BootVm(vm_pb2.BootVmRequest(vm_id="tiny")).state == vm_pb2.VM_STATE_RUNNING
    console = vms.GetConsoleLog(vm_pb2.GetConsoleLogRequest(vm_id="tiny")).text
    assert guest_images.TINY_GUEST_MARKER in console
    assert vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="tiny", force=True)).success
