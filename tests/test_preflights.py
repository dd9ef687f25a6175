"""Preflight passes kept a moment per agent session: exact config and backend, briefly, and
bounded in number."""

from __future__ import annotations

import time

from controller.preflights import PassedPreflights
from vmm.v1 import vm_pb2


def config(vcpus: int = 1, kernel: str = "/var/lib/vmm/vmlinux") -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(cpu=vm_pb2.CpuConfig(vcpu_count=vcpus),
                           boot=vm_pb2.BootConfig(kernel_path=kernel))


def test_a_pass_holds_for_that_config_and_backend_only_and_only_briefly() -> None:
    passes = PassedPreflights(reuse_seconds=0.2)
    assert not passes.passed("firecracker", config())
    passes.note_passed("firecracker", config())
    assert passes.passed("firecracker", config())
    assert not passes.passed("cloud-hypervisor", config())
    assert not passes.passed("firecracker", config(vcpus=2))
    assert not passes.passed("firecracker", config(kernel="/var/lib/vmm/other"))
    time.sleep(0.25)
    assert not passes.passed("firecracker", config())


def test_the_oldest_passes_give_way_beyond_the_bound() -> None:
    passes = PassedPreflights(max_kept=3)
    for vcpus in range(1, 5):
        passes.note_passed("firecracker", config(vcpus))
    assert not passes.passed("firecracker", config(1))
    assert all(passes.passed("firecracker", config(v)) for v in (2, 3, 4))
    # Passing again makes a config the newest.
    passes.note_passed("firecracker", config(2))
    passes.note_passed("firecracker", config(5))
    assert passes.passed("firecracker", config(2))
    assert not passes.passed("firecracker", config(3))
