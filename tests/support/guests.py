"""pytest fixtures for tests that boot real guests under QEMU: the binary, the images, KVM.

Each skips with a reason naming what is missing.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from agent.runtimes.qemu.accel import kvm_cpu_model, kvm_device_usable
from tools.guests.images import (
    GuestBuildError,
    LinuxGuest,
    TinyGuest,
    default_cache_dir,
    linux_guest,
    tiny_guest,
)


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("needs qemu-system-x86_64 on PATH (Debian package qemu-system-x86)")
    return binary


@pytest.fixture(scope="session")
def linux(qemu_binary: str) -> LinuxGuest:
    try:
        return linux_guest(default_cache_dir())
    except GuestBuildError as e:
        pytest.skip(f"cannot build the Linux guest (Debian's cloud kernel package): {e}")


@pytest.fixture(scope="session")
def tiny(qemu_binary: str) -> TinyGuest:
    try:
        return tiny_guest(default_cache_dir())
    except GuestBuildError as e:
        pytest.skip(f"cannot build the tiny guest: {e}")


@pytest.fixture(scope="session")
def kvm(qemu_binary: str) -> None:
    if not kvm_device_usable():
        pytest.skip("needs a usable /dev/kvm (read-write, KVM API 12)")
    if asyncio.run(kvm_cpu_model(qemu_binary)) is None:
        pytest.skip("needs a KVM on which QEMU can start a vCPU with the host CPU model")
