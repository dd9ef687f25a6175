"""The Cloud Hypervisor backend: one `cloud-hypervisor` process per VM, driven over its API.

Each VM gets `cloud-hypervisor --api-socket path=<vm-dir>/api.sock --no-shutdown`;
the whole VmConfig goes in one PUT vm.create, then vm.boot. `--no-shutdown`
keeps the VMM when the guest powers off, so a stopped VM boots again in the
same process. Cloud Hypervisor v53.0 drops the booted VM on a shutdown and
reports its state as "Created" again; the runtime records in runtime.json
whether the VM has booted (`phase`) and reads "Created" after a boot as SHUTDOWN.

The guest's serial port is in mode Tty: Cloud Hypervisor writes it to its
stdout, which the agent appends to console.log. (Mode File would truncate its
file at every boot and reboot, losing the console history.) Cloud Hypervisor's
own log goes to hypervisor.log.

When the config names a readiness marker (boot_options["ready_marker"]), boot
and reboot wait up to `boot_timeout` for it on the console (agent.runtimes.readiness).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from google.protobuf import json_format

from agent import process
from agent.hypervisors.cloud_hypervisor_api import (
    CloudHypervisorApi,
    CloudHypervisorApiError,
    ConsoleJson,
    CpuAffinityJson,
    CpusJson,
    DeviceJson,
    DiskJson,
    MemoryJson,
    MemoryZoneJson,
    NetJson,
    NumaNodeJson,
    PayloadJson,
    RateLimiterJson,
    VmConfigJson,
    VmInfo,
    VmState,
)
from agent.process import ProcessRef
from agent.runtimes.base import (
    Observation,
    Runtime,
    RuntimeFailure,
    RuntimeSettings,
    check_host_paths,
    console_tail,
    find_binary,
)
from agent.runtimes.readiness import console_offset, ready_marker, wait_for_console_marker
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.features import feature
from vmm.v1 import host_pb2, vm_pb2

BINARY_NAME = "cloud-hypervisor"
SIMULATOR_NAME = "cloud-hypervisor-sim"
MIB = 1 << 20
HUGEPAGE_SIZES = {"2M": 2 * MIB, "1G": 1 << 30}
IMAGE_TYPES = {"raw": "Raw", "qcow2": "Qcow2", "vhd": "FixedVhd", "vhdx": "Vhdx"}
# Seconds between two looks at a VM that is stopping.
POLL_INTERVAL = 0.05
# Seconds the VMM gets to exit by itself after vmm.shutdown before it is killed.
EXIT_GRACE = 2.0

# vm.info's states as ours.
_VM_STATES = {
    VmState.CREATED.value: vm_pb2.VM_STATE_CREATED,
    VmState.RUNNING.value: vm_pb2.VM_STATE_RUNNING,
    VmState.PAUSED.value: vm_pb2.VM_STATE_PAUSED,
    VmState.SHUTDOWN.value: vm_pb2.VM_STATE_SHUTDOWN,
}

# The phases recorded in runtime.json.
PHASE_CREATED = "created"
PHASE_BOOTED = "booted"
PHASE_STOPPED = "stopped"


# ---- the support matrix ---------------------------------------------------------------


def cloud_hypervisor_capabilities() -> host_pb2.BackendCapabilities:
    """The Cloud Hypervisor column of the backend support matrix."""
    full = host_pb2.SUPPORT_FULL
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
            feature("cpu.affinity", full, 'pin vCPUs to host CPUs: features["affinity"]'),
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
            feature("debug.gdb", full,
                    "needs a cloud-hypervisor built with the guest_debug feature"),
        ],
    )


# ---- VmConfig (vmm.v1) -> Cloud Hypervisor's VmConfig ----------------------------------


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


class ConfigTranslation:
    """Builds Cloud Hypervisor's VmConfig from ours, collecting what cannot be expressed."""

    def __init__(self, config: vm_pb2.VmConfig) -> None:
        self.config = config
        self.violations: list[agent_pb2.FieldViolation] = []

    def refuse(self, field_path: str, description: str) -> None:
        self.violations.append(agent_pb2.FieldViolation(field=field_path,
                                                        description=description))

    def integer(self, options: Any, key: str, field_path: str, minimum: int = 0) -> int | None:
        if key not in options:
            return None
        try:
            value = int(options[key])
        except ValueError:
            value = minimum - 1
        if value < minimum:
            self.refuse(f"{field_path}[{key}]",
                        f"must be an integer >= {minimum}, not {options[key]!r}")
            return None
        return value

    def build(self) -> VmConfigJson:
        config = self.config
        result: VmConfigJson = {
            "cpus": self.cpus(),
            "memory": self.memory(),
            "payload": self.payload(),
            "rng": {"src": "/dev/urandom"},
            "serial": ConsoleJson(mode="Tty"),
            "console": ConsoleJson(mode="Off"),
        }
        disks = [self.disk(d, f"config.storage[{i}]") for i, d in enumerate(config.storage)]
        if disks:
            result["disks"] = disks
        nets: list[NetJson] = []
        devices: list[DeviceJson] = []
        for i, nic in enumerate(config.network):
            if nic.interface_type.lower() in features.SRIOV_TYPES:
                devices.append(self.vfio_device(nic, f"config.network[{i}]"))
            else:
                nets.append(self.net(nic, f"config.network[{i}]"))
        if nets:
            result["net"] = nets
        if devices:
            result["devices"] = devices
        numa = self.numa(result["memory"], result["cpus"]["max_vcpus"])
        if numa:
            result["numa"] = numa
        self.check_ids()
        return result

    # ---- CPU and memory

    def cpus(self) -> CpusJson:
        cpu = self.config.cpu
        boot = cpu.vcpu_count or 1
        maximum = cpu.max_vcpu_count or boot
        if maximum < boot:
            self.refuse("config.cpu.max_vcpu_count",
                        f"max_vcpu_count {maximum} is below vcpu_count {boot}")
        result: CpusJson = {"boot_vcpus": boot, "max_vcpus": maximum}
        t = cpu.topology
        if cpu.HasField("topology") and (t.sockets or t.cores_per_socket or t.threads_per_core):
            threads, packages = t.threads_per_core or 1, t.sockets or 1
            cores = t.cores_per_socket or max(1, maximum // (threads * packages))
            if threads * cores * packages != maximum:
                self.refuse("config.cpu.topology",
                            f"sockets x cores_per_socket x threads_per_core = "
                            f"{packages * cores * threads}, but Cloud Hypervisor needs it to "
                            f"equal max_vcpu_count ({maximum})")
            result["topology"] = {"threads_per_core": threads, "cores_per_die": cores,
                                  "dies_per_package": 1, "packages": packages}
        if features.CPU_AFFINITY_KEY in cpu.features:
            host_cpus = self.cpu_list(cpu.features[features.CPU_AFFINITY_KEY])
            if host_cpus:
                result["affinity"] = [CpuAffinityJson(vcpu=v, host_cpus=host_cpus)
                                      for v in range(maximum)]
        return result

    def cpu_list(self, text: str) -> list[int]:
        """Host CPUs in cpuset syntax: "0-3,6"."""
        cpus: list[int] = []
        try:
            for part in text.split(","):
                first, _, last = part.strip().partition("-")
                low, high = int(first), int(last or first)
                if low < 0 or high < low:
                    raise ValueError(part)
                cpus.extend(range(low, high + 1))
        except ValueError:
            self.refuse(f"config.cpu.features[{features.CPU_AFFINITY_KEY}]",
                        f'expected host CPUs like "0-3,6", got {text!r}')
            return []
        return sorted(set(cpus))

    def memory(self) -> MemoryJson:
        mem = self.config.memory
        result: MemoryJson = {"size": mem.size_bytes}
        if (mem.hotplug_enabled or mem.max_size_bytes) and mem.max_size_bytes > mem.size_bytes:
            result["hotplug_size"] = mem.max_size_bytes - mem.size_bytes
        backing = mem.backing
        if features.HUGEPAGES_KEY in backing:
            size = HUGEPAGE_SIZES.get(backing[features.HUGEPAGES_KEY].strip().upper())
            if size is None:
                self.refuse(f"config.memory.backing[{features.HUGEPAGES_KEY}]",
                            f'must be "2M" or "1G", not {backing[features.HUGEPAGES_KEY]!r}')
            else:
                result["hugepages"] = True
                result["hugepage_size"] = size
        vhost_user = any(n.interface_type.lower() in features.VHOST_USER_TYPES
                         for n in self.config.network) or any(
            d.interface_type.lower() in features.VHOST_USER_TYPES for d in self.config.storage)
        # vhost-user back-ends map guest memory, so it must be shared.
        if _truthy(backing.get(features.SHARED_KEY, "")) or vhost_user:
            result["shared"] = True
        return result

    def numa(self, memory: MemoryJson, max_vcpus: int) -> list[NumaNodeJson]:
        """Guest NUMA nodes: the RAM split into one memory zone per node, vCPUs in blocks."""
        field_path = f"config.memory.backing[{features.NUMA_KEY}]"
        nodes = self.integer(self.config.memory.backing, features.NUMA_KEY,
                             "config.memory.backing", minimum=1)
        if nodes is None or nodes == 1:
            return []
        if nodes > max_vcpus:
            self.refuse(field_path, f"{nodes} NUMA nodes need at least as many vCPUs "
                        f"(max_vcpu_count is {max_vcpus})")
            return []
        if "hotplug_size" in memory:
            self.refuse(field_path, "memory hotplug cannot be combined with NUMA nodes on "
                        "cloud-hypervisor (hotplug there is per memory zone)")
            return []
        total = memory["size"]
        zone_size = total // nodes // MIB * MIB
        zones: list[MemoryZoneJson] = []
        result: list[NumaNodeJson] = []
        for node in range(nodes):
            size = zone_size if node < nodes - 1 else total - zone_size * (nodes - 1)
            zone: MemoryZoneJson = {"id": f"mem{node}", "size": size}
            if "shared" in memory:
                zone["shared"] = memory["shared"]
            if "hugepage_size" in memory:
                zone["hugepages"] = True
                zone["hugepage_size"] = memory["hugepage_size"]
            zones.append(zone)
            cpus = list(range(node * max_vcpus // nodes, (node + 1) * max_vcpus // nodes))
            result.append({"guest_numa_id": node, "cpus": cpus, "memory_zones": [f"mem{node}"]})
        # With zones, the top-level size is 0 and each zone carries its own RAM and backing.
        for key in ("shared", "hugepages", "hugepage_size"):
            memory.pop(key, None)  # type: ignore[misc]
        memory["size"] = 0
        memory["zones"] = zones
        return result

    def payload(self) -> PayloadJson:
        boot = self.config.boot
        if not boot.kernel_path:
            self.refuse("config.boot.kernel_path", "Cloud Hypervisor needs a kernel to boot")
        result: PayloadJson = {"kernel": boot.kernel_path}
        if boot.initrd_path:
            result["initramfs"] = boot.initrd_path
        if boot.kernel_args:
            result["cmdline"] = boot.kernel_args
        return result

    # ---- devices

    def rate_limiter(self, options: Any, field_path: str) -> RateLimiterJson | None:
        """Per-second budgets: rate_limit_bandwidth (bytes/s) and rate_limit_ops (ops/s)."""
        limiter: RateLimiterJson = {}
        bandwidth = self.integer(options, "rate_limit_bandwidth", field_path, minimum=1)
        if bandwidth is not None:
            limiter["bandwidth"] = {"size": bandwidth, "refill_time": 1000}
        ops = self.integer(options, "rate_limit_ops", field_path, minimum=1)
        if ops is not None:
            limiter["ops"] = {"size": ops, "refill_time": 1000}
        return limiter or None

    def disk(self, device: vm_pb2.StorageDevice, field_path: str) -> DiskJson:
        options, opts_path = device.options, f"{field_path}.options"
        result: DiskJson = {"readonly": device.read_only}
        if device.id:
            result["id"] = device.id
        if device.interface_type.lower() in features.VHOST_USER_TYPES:
            result["vhost_user"] = True
            if "vhost_socket" not in options:
                self.refuse(f"{opts_path}[vhost_socket]",
                            "a vhost-user disk needs the back-end's socket path")
            else:
                result["vhost_socket"] = options["vhost_socket"]
        else:
            result["path"] = device.path
            kind = options.get("image_type", "raw").lower()
            if kind not in IMAGE_TYPES:
                self.refuse(f"{opts_path}[image_type]",
                            f"must be one of {', '.join(IMAGE_TYPES)}, not {kind!r}")
            result["image_type"] = IMAGE_TYPES.get(kind, "Raw")
        if _truthy(options.get("direct", "")) or options.get("cache_type", "").lower() == "none":
            result["direct"] = True
        engine = options.get("io_engine", "").lower()
        if engine == "sync":
            result["disable_io_uring"] = result["disable_aio"] = True
        elif engine in ("aio", "libaio"):
            result["disable_io_uring"] = True
        elif engine not in ("", "io_uring", "async"):
            self.refuse(f"{opts_path}[io_engine]",
                        f'must be "io_uring", "aio" or "sync", not {engine!r}')
        queues = self.integer(options, "num_queues", opts_path, minimum=1)
        if queues is not None:
            result["num_queues"] = queues
        queue_size = self.integer(options, "queue_size", opts_path, minimum=1)
        if queue_size is not None:
            result["queue_size"] = queue_size
        limiter = self.rate_limiter(options, opts_path)
        if limiter:
            result["rate_limiter_config"] = limiter
        if "serial" in options:
            result["serial"] = options["serial"]
        return result

    def net(self, nic: vm_pb2.NetworkInterface, field_path: str) -> NetJson:
        options, opts_path = nic.options, f"{field_path}.options"
        result: NetJson = {}
        if nic.id:
            result["id"] = nic.id
        if nic.mac_address:
            result["mac"] = nic.mac_address
        if nic.interface_type.lower() in features.VHOST_USER_TYPES:
            result["vhost_user"] = True
            if "vhost_socket" not in options:
                self.refuse(f"{opts_path}[vhost_socket]",
                            "a vhost-user interface needs the back-end's socket path")
            else:
                result["vhost_socket"] = options["vhost_socket"]
            mode = options.get("vhost_mode", "client").capitalize()
            if mode not in ("Client", "Server"):
                self.refuse(f"{opts_path}[vhost_mode]", 'must be "client" or "server"')
            result["vhost_mode"] = mode
        elif nic.tap_device:
            result["tap"] = nic.tap_device
        queues = self.integer(options, "num_queues", opts_path, minimum=1)
        if queues is not None:
            result["num_queues"] = queues
        queue_size = self.integer(options, "queue_size", opts_path, minimum=1)
        if queue_size is not None:
            result["queue_size"] = queue_size
        mtu = self.integer(options, "mtu", opts_path, minimum=1)
        if mtu is not None:
            result["mtu"] = mtu
        if "host_mac" in options:
            result["host_mac"] = options["host_mac"]
        limiter = self.rate_limiter(options, opts_path)
        if limiter:
            result["rate_limiter_config"] = limiter
        return result

    def vfio_device(self, nic: vm_pb2.NetworkInterface, field_path: str) -> DeviceJson:
        result: DeviceJson = {"path": nic.options.get("vfio_path", "")}
        if nic.id:
            result["id"] = nic.id
        if not result["path"]:
            self.refuse(f"{field_path}.options[vfio_path]",
                        "an SR-IOV interface needs the virtual function's sysfs path, "
                        "e.g. /sys/bus/pci/devices/0000:3b:02.1")
        return result

    def check_ids(self) -> None:
        """Cloud Hypervisor needs device ids unique across all devices, none starting "__"."""
        seen: dict[str, str] = {}
        named = [(d.id, f"config.storage[{i}].id") for i, d in enumerate(self.config.storage)]
        named += [(n.id, f"config.network[{i}].id") for i, n in enumerate(self.config.network)]
        for device_id, field_path in named:
            if not device_id:
                continue
            if device_id.startswith("__"):
                self.refuse(field_path, f"device id {device_id!r} may not start with '__'")
            elif device_id in seen:
                self.refuse(field_path, f"device id {device_id!r} is already used by "
                            f"{seen[device_id]}")
            seen[device_id] = field_path


def translate_config(config: vm_pb2.VmConfig
                     ) -> tuple[VmConfigJson, list[agent_pb2.FieldViolation]]:
    """Cloud Hypervisor's VmConfig for ours, and what in ours it cannot express."""
    translation = ConfigTranslation(config)
    return translation.build(), translation.violations


def _vm_config_or_refuse(config: vm_pb2.VmConfig) -> VmConfigJson:
    translation = ConfigTranslation(config)
    result = translation.build()
    _refuse_violations(translation)
    return result


def _refuse_violations(translation: ConfigTranslation) -> None:
    if translation.violations:
        raise RuntimeFailure("; ".join(f"{v.field}: {v.description}"
                                       for v in translation.violations), "INVALID_ARGUMENT")


def _disk_to_attach(config: vm_pb2.VmConfig) -> DiskJson:
    """Cloud Hypervisor's DiskConfig for the config's last disk, the one being attached."""
    translation = ConfigTranslation(config)
    translation.check_ids()
    index = len(config.storage) - 1
    disk = translation.disk(config.storage[index], f"config.storage[{index}]")
    _refuse_violations(translation)
    return disk


def _nic_to_attach(config: vm_pb2.VmConfig) -> NetJson | DeviceJson:
    """The NetConfig (or, for SR-IOV, the VFIO DeviceConfig) of the config's last NIC."""
    translation = ConfigTranslation(config)
    translation.check_ids()
    index = len(config.network) - 1
    nic = config.network[index]
    field_path = f"config.network[{index}]"
    result: NetJson | DeviceJson = (
        translation.vfio_device(nic, field_path)
        if nic.interface_type.lower() in features.SRIOV_TYPES
        else translation.net(nic, field_path))
    _refuse_violations(translation)
    return result


# ---- Cloud Hypervisor's view -> VmConfig (vmm.v1) --------------------------------------


def running_config(recorded: vm_pb2.VmConfig, info: VmInfo) -> vm_pb2.VmConfig:
    """Our config as the VMM now runs it: its vCPUs, RAM, disks and NICs (with the ids it
    generated), keeping what only our config says (root flag, options, ...)."""
    result = vm_pb2.VmConfig()
    result.CopyFrom(recorded)
    cpus, memory = info.config.get("cpus") or {}, info.config.get("memory") or {}
    if "boot_vcpus" in cpus:
        result.cpu.vcpu_count = int(cpus["boot_vcpus"])
    if "size" in memory:
        zones = memory.get("zones") or []
        result.memory.size_bytes = int(memory["size"]) + sum(int(z["size"]) for z in zones)
    del result.storage[:]
    result.storage.extend(_match_devices(
        list(recorded.storage), info.devices("disks"), _same_disk, _disk_from_vmm))
    del result.network[:]
    # NICs are virtio-net devices, or VFIO devices for SR-IOV interfaces.
    result.network.extend(_match_devices(
        list(recorded.network), info.devices("net") + info.devices("devices"), _same_nic,
        _nic_from_vmm))
    return result


def _same_disk(ours: vm_pb2.StorageDevice, theirs: dict[str, Any]) -> bool:
    return bool(ours.path == theirs.get("path", ours.path))


def _disk_from_vmm(theirs: dict[str, Any]) -> vm_pb2.StorageDevice:
    return vm_pb2.StorageDevice(path=str(theirs.get("path", "")),
                                read_only=bool(theirs.get("readonly")))


def _same_nic(ours: vm_pb2.NetworkInterface, theirs: dict[str, Any]) -> bool:
    if "path" in theirs:  # a VFIO device
        return bool(ours.options.get("vfio_path") == theirs["path"])
    return bool(ours.tap_device == theirs.get("tap", ours.tap_device))


def _nic_from_vmm(theirs: dict[str, Any]) -> vm_pb2.NetworkInterface:
    if "path" in theirs:
        return vm_pb2.NetworkInterface(interface_type="vfio",
                                       options={"vfio_path": str(theirs["path"])})
    return vm_pb2.NetworkInterface(tap_device=str(theirs.get("tap", "")),
                                   mac_address=str(theirs.get("mac", "")))


Device = TypeVar("Device", vm_pb2.StorageDevice, vm_pb2.NetworkInterface)


def _match_devices(ours: list[Device], theirs: list[dict[str, Any]],
                   same: Callable[[Device, dict[str, Any]], bool],
                   make: Callable[[dict[str, Any]], Device]) -> list[Device]:
    """The VMM's devices, in its order, each as our entry: matched by id, else by path/TAP
    among our unnamed entries, else built from what the VMM says."""
    by_id = {d.id: d for d in ours if d.id}
    unnamed = [d for d in ours if not d.id]
    matched = []
    for device in theirs:
        device_id = str(device.get("id", ""))
        entry = by_id.get(device_id)
        if entry is None:
            entry = next((d for d in unnamed if same(d, device)), None)
            if entry is not None:
                unnamed.remove(entry)
        result = make(device)
        if entry is not None:
            result.CopyFrom(entry)
        result.id = device_id
        matched.append(result)
    return matched


# ---- binaries --------------------------------------------------------------------------


def simulator_path() -> str | None:
    """The project's Cloud Hypervisor API simulator, installed beside this Python."""
    found = shutil.which(SIMULATOR_NAME)
    if found:
        return found
    beside = Path(sys.executable).with_name(SIMULATOR_NAME)
    return str(beside) if beside.exists() else None


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


# ---- the runtime -----------------------------------------------------------------------


class CloudHypervisorRuntime(Runtime):
    name = features.CLOUD_HYPERVISOR

    def __init__(self, binary: str, simulated: bool, settings: RuntimeSettings) -> None:
        super().__init__(binary, simulated, settings)
        # The last (monotonic time, CPU seconds) per VM, for cpu_usage_percent.
        self._cpu_samples: dict[Path, tuple[float, float]] = {}

    @classmethod
    def detect(cls, settings: RuntimeSettings) -> CloudHypervisorRuntime | None:
        """The configured binary, else cloud-hypervisor on PATH, else the simulator.

        A configured binary that does not exist gives no runtime rather than the
        simulator: a host set up for the real hypervisor must not quietly fake it.
        """
        if not settings.force_simulator:
            if settings.binary:
                configured = find_binary(settings.binary, ())
                return cls(configured, False, settings) if configured else None
            found = find_binary(None, (BINARY_NAME,))
            if found:
                return cls(found, False, settings)
        simulator = simulator_path()
        return cls(simulator, True, settings) if simulator else None

    def capabilities(self) -> host_pb2.BackendCapabilities:
        return cloud_hypervisor_capabilities()

    def version(self) -> str:
        return binary_version(self.binary)

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        _, violations = translate_config(config)
        return check_host_paths(config) + violations

    # ---- lifecycle

    async def create(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        vm_config = _vm_config_or_refuse(desired.config)
        vm.create()
        if self.live_process(vm) is None:
            ref = await self._start_vmm(vm, desired.config)
        else:
            ref = self._require_process(vm)
        try:
            async with self._api(vm) as api:
                if await self._state(api) is None:
                    await api.create_vm(vm_config)
        except RuntimeFailure:
            await self._stop_vmm(vm, ref)
            vm.clear_runtime()
            raise

    async def boot(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        if self.live_process(vm) is None:
            await self.create(vm, desired)
        ref = self._require_process(vm)
        async with self._api(vm) as api:
            state = await self._state(api)
            if state is None:
                await api.create_vm(_vm_config_or_refuse(desired.config))
            elif state == VmState.RUNNING:
                return
            elif state == VmState.PAUSED:
                await api.resume_vm()
                return
            offset = console_offset(vm)
            await api.boot_vm()
        self._update_record(vm, phase=PHASE_BOOTED, booted_at=time.time())
        await self._await_ready(vm, ref, desired.config, offset)

    async def pause(self, vm: VmDir) -> None:
        self._require_process(vm)
        async with self._api(vm) as api:
            if await self._state(api) != VmState.PAUSED:
                await api.pause_vm()

    async def resume(self, vm: VmDir) -> None:
        self._require_process(vm)
        async with self._api(vm) as api:
            if await self._state(api) != VmState.RUNNING:
                await api.resume_vm()

    async def shutdown(self, vm: VmDir, force: bool, timeout: float) -> None:
        ref = self.live_process(vm)
        if ref is None:
            return
        async with self._api(vm) as api:
            if await self._guest_running(api) and not force:
                await self._press_power_button(api, ref, timeout)
            if process.is_alive(ref) and await self._guest_running(api):
                await api.shutdown_vm()
        if process.is_alive(ref):
            self._update_record(vm, phase=PHASE_STOPPED, booted_at=0)

    async def _press_power_button(self, api: CloudHypervisorApi, ref: ProcessRef,
                                  grace: float) -> None:
        """ACPI shutdown: the guest gets up to `grace` seconds to power itself off."""
        if await self._state(api) == VmState.PAUSED:
            await api.resume_vm()  # a paused guest cannot see the button
        await api.power_button()
        deadline = time.monotonic() + (grace if grace > 0
                                       else self.settings.default_shutdown_timeout)
        while time.monotonic() < deadline:
            # Without --no-shutdown (an older VMM) the process itself ends.
            if not process.is_alive(ref) or not await self._guest_running(api):
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def reboot(self, vm: VmDir, desired: agent_pb2.DesiredVm, force: bool) -> None:
        # Cloud Hypervisor has one reboot: the VMM resets the VM (no guest cooperation),
        # so `force` changes nothing.
        ref = self.live_process(vm)
        if ref is not None:
            async with self._api(vm) as api:
                running = await self._guest_running(api)
                offset = console_offset(vm)
                if running:
                    await api.reboot_vm()
            if running:
                self._update_record(vm, phase=PHASE_BOOTED, booted_at=time.time())
                await self._await_ready(vm, ref, desired.config, offset)
                return
        await self.boot(vm, desired)

    async def destroy(self, vm: VmDir) -> None:
        ref = self.load_process(vm)
        if ref is not None:
            await self._stop_vmm(vm, ref)
        vm.api_socket.unlink(missing_ok=True)
        vm.clear_runtime()
        self._cpu_samples.pop(vm.path, None)

    async def _stop_vmm(self, vm: VmDir, ref: ProcessRef) -> None:
        """vm.delete and vmm.shutdown, then SIGKILL if the VMM is still there."""
        if process.is_alive(ref):
            try:
                async with CloudHypervisorApi(vm.api_socket, timeout=EXIT_GRACE) as api:
                    await api.delete_vm()
                    await api.shutdown_vmm()
            except RuntimeFailure:
                pass  # it is killed below
            if not await process.wait_exit(ref, EXIT_GRACE):
                await process.kill(ref)
        vm.api_socket.unlink(missing_ok=True)

    # ---- observation

    async def observe(self, vm: VmDir) -> Observation:
        ref = self.load_process(vm)
        if ref is None:
            return Observation(alive=False, detail="no cloud-hypervisor process is recorded")
        if not process.is_alive(ref):
            return Observation(alive=False, pid=ref.pid, detail=process.exit_detail(ref))
        info = {"api_socket": str(vm.api_socket), "simulated": str(self.simulated).lower()}
        try:
            async with self._api(vm) as api:
                vm_info = await api.vm_info()
        except CloudHypervisorApiError as e:
            detail = "the cloud-hypervisor process holds no VM" if e.vm_not_created else e.message
            return Observation(alive=True, pid=ref.pid, backend_info=info, detail=detail)
        except RuntimeFailure as e:
            return Observation(alive=True, pid=ref.pid, backend_info=info, detail=e.message)
        info["hypervisor_state"] = vm_info.state
        info["memory_actual_size"] = str(vm_info.memory_actual_size)
        state = _VM_STATES.get(vm_info.state, vm_pb2.VM_STATE_UNSPECIFIED)
        # v53.0 reports a VM that was booted and then stopped as "Created" again.
        if (state == vm_pb2.VM_STATE_CREATED
                and vm.load_runtime().get("phase", PHASE_CREATED) != PHASE_CREATED):
            state = vm_pb2.VM_STATE_SHUTDOWN
        return Observation(alive=True, pid=ref.pid, backend_info=info, state=state)

    async def metrics(self, vm: VmDir) -> vm_pb2.VmMetrics:
        ref = self.live_process(vm)
        if ref is None:
            return vm_pb2.VmMetrics()
        result = vm_pb2.VmMetrics(memory_usage_bytes=process.rss_bytes(ref),
                                  cpu_usage_percent=self._cpu_percent(vm, ref))
        try:
            async with self._api(vm) as api:
                counters = await api.vm_counters()
        except CloudHypervisorApiError:
            return result  # not booted: no devices to count
        for device in counters.values():
            result.storage_stats.bytes_read += device.get("read_bytes", 0)
            result.storage_stats.bytes_written += device.get("write_bytes", 0)
            result.storage_stats.read_operations += device.get("read_ops", 0)
            result.storage_stats.write_operations += device.get("write_ops", 0)
            result.network_stats.bytes_received += device.get("rx_bytes", 0)
            result.network_stats.bytes_transmitted += device.get("tx_bytes", 0)
            result.network_stats.packets_received += device.get("rx_frames", 0)
            result.network_stats.packets_transmitted += device.get("tx_frames", 0)
        booted_at = float(vm.load_runtime().get("booted_at") or 0)
        if booted_at:
            result.uptime_seconds = max(0, int(time.time() - booted_at))
        return result

    def _cpu_percent(self, vm: VmDir, ref: ProcessRef) -> float:
        now, used = time.monotonic(), process.cpu_seconds(ref)
        previous = self._cpu_samples.get(vm.path)
        self._cpu_samples[vm.path] = (now, used)
        if previous is None:
            elapsed, spent = time.time() - ref.started_at, used
        else:
            elapsed, spent = now - previous[0], used - previous[1]
        return max(0.0, 100.0 * spent / elapsed) if elapsed > 0 else 0.0

    # ---- hotplug

    async def hotplug(self, vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
        self._require_process(vm)
        recorded = self._recorded_config(vm)
        change = request.WhichOneof("change")
        async with self._api(vm) as api:
            before = await api.vm_info()
            if change == "resize":
                await self._resize(vm, api, before, request.resize)
            elif change == "attach_disk":
                recorded.storage.append(request.attach_disk)
                await api.add_disk(_disk_to_attach(recorded))
            elif change == "attach_nic":
                recorded.network.append(request.attach_nic)
                nic = _nic_to_attach(recorded)
                if "path" in nic:
                    await api.add_device(cast(DeviceJson, nic))
                else:
                    await api.add_net(cast(NetJson, nic))
            elif change == "detach_disk":
                await self._detach(vm, api, before, request.detach_disk, ("disks",), "disk")
            elif change == "detach_nic":
                await self._detach(vm, api, before, request.detach_nic, ("net", "devices"),
                                   "network interface")
            else:
                raise RuntimeFailure("the hotplug request names no change", "INVALID_ARGUMENT")
            updated = running_config(recorded, await api.vm_info())
        self._update_record(vm, config=json_format.MessageToDict(updated))
        return updated

    @staticmethod
    async def _detach(vm: VmDir, api: CloudHypervisorApi, info: VmInfo, device_id: str,
                      kinds: tuple[str, ...], what: str) -> None:
        if device_id not in {d.get("id") for kind in kinds for d in info.devices(kind)}:
            raise RuntimeFailure(f"VM {vm.vm_id} has no {what} with id {device_id!r}",
                                 "NOT_FOUND")
        await api.remove_device(device_id)

    async def _resize(self, vm: VmDir, api: CloudHypervisorApi, info: VmInfo,
                      resize: vm_pb2.ResizeVmRequest) -> None:
        cpus, memory = info.config.get("cpus") or {}, info.config.get("memory") or {}
        vcpus = resize.vcpu_count or None
        if vcpus is not None and vcpus > int(cpus.get("max_vcpus", 0)):
            raise RuntimeFailure(
                f"vcpu_count {vcpus} exceeds the VM's max_vcpu_count "
                f"{cpus.get('max_vcpus')}: Cloud Hypervisor hot-adds vCPUs only up to "
                "config.cpu.max_vcpu_count, set when the VM is created", "INVALID_ARGUMENT")
        ram = resize.memory_size_bytes or None
        if ram is not None and ram != int(memory.get("size", 0)):
            self._check_memory_resize(vm, memory, ram)
        await api.resize(desired_vcpus=vcpus, desired_ram=ram)

    def _check_memory_resize(self, vm: VmDir, memory: dict[str, Any], ram: int) -> None:
        if memory.get("zones"):
            raise RuntimeFailure("memory hotplug is not available for a VM with NUMA nodes "
                                 "on cloud-hypervisor", "FAILED_PRECONDITION")
        maximum = int(vm.load_runtime().get("max_memory_bytes") or 0)
        if "hotplug_size" not in memory or not maximum:
            raise RuntimeFailure("memory hotplug needs config.memory.hotplug_enabled and a "
                                 "config.memory.max_size_bytes above size_bytes when the VM is "
                                 "created", "INVALID_ARGUMENT")
        if ram > maximum:
            raise RuntimeFailure(f"memory_size_bytes {ram} exceeds the VM's max_size_bytes "
                                 f"{maximum} (config.memory.max_size_bytes)", "INVALID_ARGUMENT")
        if ram < int(memory.get("size", 0)):
            raise RuntimeFailure("Cloud Hypervisor cannot take ACPI-hotplugged memory back from "
                                 "a running guest; memory_size_bytes may only grow",
                                 "INVALID_ARGUMENT")

    # ---- helpers

    def _api(self, vm: VmDir) -> CloudHypervisorApi:
        return CloudHypervisorApi(vm.api_socket)

    @staticmethod
    async def _state(api: CloudHypervisorApi) -> str | None:
        """The VM's state, or None when the VMM holds no VM."""
        try:
            return (await api.vm_info()).state
        except CloudHypervisorApiError as e:
            if e.vm_not_created:
                return None
            raise

    async def _guest_running(self, api: CloudHypervisorApi) -> bool:
        return await self._state(api) in (VmState.RUNNING, VmState.PAUSED)

    def _require_process(self, vm: VmDir) -> ProcessRef:
        ref = self.live_process(vm)
        if ref is None:
            raise RuntimeFailure(f"VM {vm.vm_id} has no running cloud-hypervisor process",
                                 "FAILED_PRECONDITION")
        return ref

    def _update_record(self, vm: VmDir, **changes: object) -> None:
        record = vm.load_runtime()
        record.update(changes)
        vm.save_runtime(record)

    def _recorded_config(self, vm: VmDir) -> vm_pb2.VmConfig:
        config = vm_pb2.VmConfig()
        recorded = vm.load_runtime().get("config")
        if isinstance(recorded, dict):
            json_format.ParseDict(recorded, config)
        return config

    async def _start_vmm(self, vm: VmDir, config: vm_pb2.VmConfig) -> ProcessRef:
        vm.api_socket.unlink(missing_ok=True)
        argv = [self.binary, "--api-socket", f"path={vm.api_socket}", "--no-shutdown",
                "--log-file", str(vm.hypervisor_log)]
        gdb_socket = config.boot.boot_options.get(features.GDB_KEY)
        if gdb_socket:
            argv += ["--gdb", f"path={gdb_socket}"]
        ref = process.spawn(argv, vm.console_log, cwd=vm.path)
        max_memory = max(config.memory.max_size_bytes, config.memory.size_bytes)
        self.save_process(vm, ref, phase=PHASE_CREATED, booted_at=0,
                          max_memory_bytes=max_memory,
                          config=json_format.MessageToDict(config))
        try:
            await process.wait_for_socket(vm.api_socket, ref, self.settings.socket_timeout)
            await self._await_api(vm)
        except (RuntimeError, TimeoutError, RuntimeFailure) as e:
            await process.kill(ref)
            vm.api_socket.unlink(missing_ok=True)
            vm.clear_runtime()
            tail = console_tail(vm, lines=10)
            raise RuntimeFailure(f"cloud-hypervisor did not start: {e}"
                                 + (f"; its output: {tail}" if tail else ""),
                                 "UNAVAILABLE") from e
        return ref

    async def _await_api(self, vm: VmDir) -> None:
        """Until the freshly created socket answers vmm.ping."""
        deadline = time.monotonic() + self.settings.socket_timeout
        async with self._api(vm) as api:
            while True:
                try:
                    await api.ping()
                    return
                except RuntimeFailure:
                    if time.monotonic() >= deadline:
                        raise
                await asyncio.sleep(POLL_INTERVAL)

    async def _await_ready(self, vm: VmDir, ref: ProcessRef, config: vm_pb2.VmConfig,
                           since_offset: int) -> None:
        marker = ready_marker(config.boot.boot_options)
        if marker:
            await wait_for_console_marker(vm, marker, self.settings.boot_timeout, since_offset,
                                          alive=lambda: process.is_alive(ref))
