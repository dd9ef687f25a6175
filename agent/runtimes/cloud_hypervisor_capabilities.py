"""What a Cloud Hypervisor offers: its column of the backend support matrix, and what its
binary says of itself (version, build options)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

from agent.runtimes.cloud_hypervisor_config import MIB
from vmm import features
from vmm.features import feature
from vmm.v1 import host_pb2

SIMULATOR_NAME = "cloud-hypervisor-sim"


# ---- the support matrix ---------------------------------------------------------------


def cloud_hypervisor_capabilities(gdb: bool | None = None) -> host_pb2.BackendCapabilities:
    """The Cloud Hypervisor column of the backend support matrix. `gdb`: whether the
    installed binary takes --gdb (None: as declared for any build)."""
    full = host_pb2.SUPPORT_FULL
    gdb_feature = (feature("debug.gdb", full,
                           "needs a cloud-hypervisor built with the guest_debug feature")
                   if gdb is None or gdb else
                   feature("debug.gdb", host_pb2.SUPPORT_NONE,
                           "this cloud-hypervisor was built without the guest_debug feature "
                           "(its --help offers no --gdb)"))
    return host_pb2.BackendCapabilities(
        backend=features.CLOUD_HYPERVISOR,
        limits=host_pb2.BackendLimits(min_vcpus=1, max_vcpus=448, min_memory_bytes=512 * MIB,
                                      max_memory_bytes=0, max_disks=0, max_nics=0),
        features=[
            feature("vm.create", full, "all unified API fields, in one vm.create"),
            feature("vm.boot", full),
            feature("vm.shutdown", full,
                    "graceful: ACPI power button, then forced after the timeout"),
            feature("vm.pause_resume", full),
            feature("vm.reboot", full, "VMM-level reset (vm.reboot)"),
            feature("vm.delete", full, "resource cleanup"),
            feature("cpu.vcpu_count", full, "1-448 vCPUs"),
            feature("cpu.hotplug", full, "runtime vCPU scaling up to max_vcpu_count"),
            feature("cpu.max_vcpu_count", full, "honored: the hotplug ceiling"),
            feature("cpu.topology", full, "sockets, cores, threads"),
            feature("cpu.affinity", full,
                    'pin vCPUs to host CPUs: features["affinity"]; vm.create must fit Cloud '
                    "Hypervisor's 51,200-byte request limit (448 vCPUs pinned to 32 host CPUs "
                    "each do; larger pinnings are refused at create)"),
            feature("memory.size", full, "512 MiB - 1 TiB+"),
            feature("memory.hotplug", full,
                    "ACPI hot-add up to max_size_bytes in 128 MiB steps; no NUMA, no unplug"),
            feature("memory.hugepages", full, "2 MiB / 1 GiB"),
            feature("memory.numa", full, "guest NUMA nodes with their own memory zones"),
            feature("memory.sharing", full, "shared guest memory, as vhost-user needs"),
            feature("storage.block", full, "files + raw block devices"),
            feature("storage.read_only", full),
            feature("storage.multiple", full, "unlimited"),
            feature("storage.hotplug", full),
            feature("storage.advanced_io", full,
                    "io_uring/aio/sync, O_DIRECT, queues, rate limiting"),
            feature("network.tap", full, "multiple TAP interfaces"),
            feature("network.mac", full, "custom MAC addresses"),
            feature("network.vhost_user", full, 'options["vhost_socket"]'),
            feature("network.hotplug", full),
            feature("network.sriov", full, 'VFIO passthrough: options["vfio_path"]'),
            feature("console.serial", full),
            feature("console.logging", full, "file output"),
            feature("debug.rich", full, "counters, device tree, hypervisor log"),
            gdb_feature,
        ],
    )


# ---- binaries --------------------------------------------------------------------------


def simulator_path() -> str | None:
    """The project's Cloud Hypervisor API simulator, installed beside this Python."""
    found = shutil.which(SIMULATOR_NAME)
    if found:
        return found
    beside = Path(sys.executable).with_name(SIMULATOR_NAME)
    return str(beside) if beside.exists() else None


@functools.lru_cache(maxsize=8)
def help_text(binary: str) -> str:
    """The binary's --help, read once: which options this build has."""
    try:
        done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def offers_gdb(binary: str) -> bool:
    """Whether the binary takes --gdb: only builds with the guest_debug feature do, and a
    default release build refuses to start when given it."""
    return "--gdb" in help_text(binary)


def offers_landlock(binary: str) -> bool:
    """Whether the binary can confine itself with Landlock (--landlock)."""
    return "--landlock" in help_text(binary)


@functools.lru_cache(maxsize=8)
def binary_version(binary: str) -> str:
    """"v53.0" from `cloud-hypervisor --version` ("cloud-hypervisor v53.0 ...")."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = done.stdout.split()
    return words[1] if len(words) > 1 else ""
