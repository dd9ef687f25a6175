"""Our VmConfig (vmm.v1) as Cloud Hypervisor's VmConfig JSON, and back.

`translate_config` builds the JSON for vm.create and lists, as field violations, what
in our config Cloud Hypervisor cannot express; the runtime refuses a config with any.
`running_config` reads the VMM's view (vm.info) back into our config after a hotplug.
The serial port is put in mode Tty: agent.runtimes.cloud_hypervisor says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from agent.hypervisors.cloud_hypervisor_api import (
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
)
from agent.runtimes.base import RuntimeFailure
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

MIB = 1 << 20
HUGEPAGE_SIZES = {"2M": 2 * MIB, "1G": 1 << 30}
IMAGE_TYPES = {"raw": "Raw", "qcow2": "Qcow2", "vhd": "FixedVhd", "vhdx": "Vhdx"}
RATE_LIMIT_OPTIONS = ("rate_limit_bandwidth", "rate_limit_ops")
# What Cloud Hypervisor checks when it boots a VM (VmConfig::validate), checked here first.
MINIMUM_BLOCK_QUEUE_SIZE = 2
MAX_QUEUE_SIZE = 32768
VIRTIO_BLK_ID_BYTES = 20
MIN_MTU, MAX_MTU = 1280, 65535
VHOST_USER_RATE_LIMITS = ("Cloud Hypervisor cannot rate-limit a vhost-user device: its "
                          "back-end does the I/O")
# micro_http, which serves Cloud Hypervisor's API, refuses larger request bodies.
MAX_REQUEST_BYTES = 51200


def request_bytes(body: object) -> int:
    """The size of a request body as the API client sends it (compact JSON)."""
    return len(json.dumps(body, separators=(",", ":")).encode())


# ---- VmConfig (vmm.v1) -> Cloud Hypervisor's VmConfig ----------------------------------


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


class ConfigTranslation:
    """Builds Cloud Hypervisor's VmConfig from ours, collecting what cannot be expressed."""

    def __init__(self, config: vm_pb2.VmConfig) -> None:
        self.config = config
        self.boot_vcpus = config.cpu.vcpu_count or 1
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
            "pvpanic": True,
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
        self.check_request_size(result)
        return result

    def check_request_size(self, body: VmConfigJson) -> None:
        """micro_http refuses a request body over MAX_REQUEST_BYTES; vm.create carries the
        whole config, and vCPU affinity (one entry per vCPU) is what grows it most."""
        size = request_bytes(body)
        if size <= MAX_REQUEST_BYTES:
            return
        affinity = body["cpus"].get("affinity")
        field_path = (f"config.cpu.features[{features.CPU_AFFINITY_KEY}]" if affinity
                      else "config")
        why = (f" ({len(affinity)} vCPUs each pinned to "
               f"{len(affinity[0]['host_cpus'])} host CPUs)" if affinity else "")
        self.refuse(field_path, f"the vm.create request would be {size} bytes{why}; Cloud "
                    f"Hypervisor's API takes at most {MAX_REQUEST_BYTES}: pin fewer vCPUs or "
                    "to fewer host CPUs")

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
        for key in sorted(options):
            if key.startswith("rate_limit_") and key not in RATE_LIMIT_OPTIONS:
                self.refuse(f"{field_path}[{key}]", "Cloud Hypervisor's rate limiter takes "
                            f"{' and '.join(RATE_LIMIT_OPTIONS)} only")
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
            # Sent only when named: Cloud Hypervisor refuses a type that differs from the
            # image's, and detects it (from the image's header) when none is given.
            if "image_type" in options:
                kind = options["image_type"].lower()
                if kind in IMAGE_TYPES:
                    result["image_type"] = IMAGE_TYPES[kind]
                else:
                    self.refuse(f"{opts_path}[image_type]",
                                f"must be one of {', '.join(IMAGE_TYPES)}, not {kind!r}")
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
            if queues > self.boot_vcpus:
                self.refuse(f"{opts_path}[num_queues]", f"{queues} queues exceed vcpu_count "
                            f"({self.boot_vcpus}): Cloud Hypervisor gives a disk at most one "
                            "queue per boot vCPU")
            result["num_queues"] = queues
        queue_size = self.queue_size(options, opts_path, minimum=MINIMUM_BLOCK_QUEUE_SIZE + 1)
        if queue_size is not None:
            result["queue_size"] = queue_size
        limiter = self.rate_limiter(options, opts_path)
        if limiter:
            if result.get("vhost_user"):
                self.refuse(f"{opts_path}[rate_limit_{next(iter(limiter))}]",
                            VHOST_USER_RATE_LIMITS)
            result["rate_limiter_config"] = limiter
        if "serial" in options:
            serial_bytes = len(options["serial"].encode())
            if serial_bytes > VIRTIO_BLK_ID_BYTES:
                self.refuse(f"{opts_path}[serial]", f"{serial_bytes} bytes; a virtio-blk "
                            f"serial holds at most {VIRTIO_BLK_ID_BYTES}")
            result["serial"] = options["serial"]
        return result

    def queue_size(self, options: Any, opts_path: str, minimum: int) -> int | None:
        size = self.integer(options, "queue_size", opts_path, minimum=1)
        if size is None:
            return None
        if size < minimum or size > MAX_QUEUE_SIZE or size & (size - 1):
            self.refuse(f"{opts_path}[queue_size]", f"must be a power of 2 from {minimum} to "
                        f"{MAX_QUEUE_SIZE}, not {size}")
            return None
        return size

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
            if queues < 2 or queues > 2 * self.boot_vcpus:
                self.refuse(f"{opts_path}[num_queues]", f"must be from 2 (one receive and one "
                            f"transmit queue) to 2 x vcpu_count ({2 * self.boot_vcpus}), "
                            f"not {queues}")
            result["num_queues"] = queues
        queue_size = self.queue_size(options, opts_path, minimum=1)
        if queue_size is not None:
            result["queue_size"] = queue_size
        mtu = self.integer(options, "mtu", opts_path, minimum=1)
        if mtu is not None:
            if not MIN_MTU <= mtu <= MAX_MTU:
                self.refuse(f"{opts_path}[mtu]", f"must be from {MIN_MTU} (the VIRTIO "
                            f"minimum) to {MAX_MTU}, not {mtu}")
            result["mtu"] = mtu
        if "host_mac" in options:
            result["host_mac"] = options["host_mac"]
        limiter = self.rate_limiter(options, opts_path)
        if limiter:
            if result.get("vhost_user"):
                self.refuse(f"{opts_path}[rate_limit_{next(iter(limiter))}]",
                            VHOST_USER_RATE_LIMITS)
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


def vm_config_or_refuse(config: vm_pb2.VmConfig) -> VmConfigJson:
    """Cloud Hypervisor's VmConfig for ours; RuntimeFailure naming every violation."""
    translation = ConfigTranslation(config)
    result = translation.build()
    _refuse_violations(translation)
    return result


def _refuse_violations(translation: ConfigTranslation) -> None:
    if translation.violations:
        raise RuntimeFailure("; ".join(f"{v.field}: {v.description}"
                                       for v in translation.violations), "INVALID_ARGUMENT")


def disk_to_attach(config: vm_pb2.VmConfig) -> DiskJson:
    """Cloud Hypervisor's DiskConfig for the config's last disk, the one being attached."""
    translation = ConfigTranslation(config)
    translation.check_ids()
    index = len(config.storage) - 1
    disk = translation.disk(config.storage[index], f"config.storage[{index}]")
    _refuse_violations(translation)
    return disk


def nic_to_attach(config: vm_pb2.VmConfig) -> NetJson | DeviceJson:
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
