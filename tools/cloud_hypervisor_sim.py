"""An API-faithful simulator of Cloud Hypervisor v53.0, started like the real binary.

    cloud-hypervisor-sim --api-socket path=/run/vm/api.sock [--no-shutdown]
                         [-v] [--log-file PATH] [--seccomp VALUE] [--gdb path=PATH]

It serves Cloud Hypervisor's HTTP API (HTTP/1.1 on a Unix socket, routes under
/api/v1) with the real routes, status codes, bodies and state machine, as read
from `vmm/src/api/http/*.rs`, `vmm/src/lib.rs`, `vmm/src/vm.rs` and
`vmm/src/config.rs` at tag v53.0. What it models, as Cloud Hypervisor does:

* Errors are a JSON array of strings, the error chain outermost first:
  400 ["Failed to deserialize JSON", <serde message>] for a bad body; 400
  ["Bad Request"] for a method a route does not take (an empty 400 for PATCH on
  an action route); 404 ["Not Found"] for an unknown route; 404 when the VM has
  no config (VmNotCreated / VmMissingConfig); 429 ["Too Many Requests"] for
  vm.resize while a vCPU removal is pending; 500 for every other API error.
* vm.create only deserialises and stores the config and opens the serial
  output. Validation (payload, boot_vcpus <= max_vcpus, identifiers, topology,
  ...) and opening the disks, initramfs and kernel happen at vm.boot, so those
  errors come from vm.boot. Unknown fields are ignored, as serde does for
  Cloud Hypervisor's config structs (none denies unknown fields); `cpus` and
  `memory` default to 1 vCPU and 512 MiB, but inside them `boot_vcpus`,
  `max_vcpus` and `size` are required.
* vm.shutdown, and a guest power-off under --no-shutdown, drop the VM but keep
  its config and the VMM: vm.info then reports "Created" again (Cloud
  Hypervisor v53.0 never shows "Shutdown" there) and vm.boot boots it anew.
  Without --no-shutdown a guest power-off ends the VMM process (status 0).
* Serial output mode File recreates (truncates) its file at vm.create, at each
  boot after a shutdown and at vm.reboot, like Cloud Hypervisor's File::create;
  mode Tty writes to the simulator's stdout.

The simulated guest:

* at each boot it prints `[    0.000000] Command line: <cmdline>` and then the
  readiness line `GUEST-READY` on the serial port, and reads the first 4 KiB of
  each disk (so vm.counters shows real reads);
* on vm.power-button it prints `reboot: Power down` and powers off shortly
  after, unless its kernel command line contains `acpi=off`: such a guest has
  no ACPI and ignores the power button, as a real Linux guest does;
* a vCPU removal (vm.resize to fewer vCPUs) stays pending for
  $CLOUD_HYPERVISOR_SIM_VCPU_UNPLUG_SECONDS seconds (default 0.2), the time the
  guest takes to eject the vCPUs; vm.resize of the vCPUs meanwhile gets 429.

Not modelled: TAP devices and vhost-user back-ends are not opened, hugepages
are not allocated, Pty/Socket serial modes behave like Null, and the routes for
snapshots, migration, fs/pmem/vsock/vdpa/VFIO devices and zone/disk resizing
exist but answer 500 with a chain that says the simulator does not implement
them. serde's "line L column C" positions point at the end of the offending
value (or of the enclosing object for a missing field); for JSON syntax errors
they are approximate.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import json.decoder
import json.scanner
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

VERSION = "53.0.0"
BUILD_VERSION = "v53.0"
API_ROOT = "/api/v1"
SERVER_HEADER = "Cloud Hypervisor API"
GUEST_READY_LINE = "GUEST-READY"
GUEST_POWEROFF_LINE = "reboot: Power down"
# Seconds between the power button press and the guest's power-off.
GUEST_POWEROFF_DELAY = 0.1
UNPLUG_SECONDS_ENV = "CLOUD_HYPERVISOR_SIM_VCPU_UNPLUG_SECONDS"
DEFAULT_UNPLUG_SECONDS = 0.2
MAX_SUPPORTED_CPUS = 8192  # x86_64 with KVM
HOTPLUG_SLOTS = 8  # ACPI memory hotplug slots
HOTPLUG_ALIGN = 128 << 20
DISK_PROBE_BYTES = 4096
MICRO_HTTP_BAD_METHOD = (
    '{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n'
    'All previous unanswered requests will be dropped." }'
)


# ---- errors ---------------------------------------------------------------------------


class ApiFailure(Exception):
    """An HTTP error answer: the status and Cloud Hypervisor's error chain."""

    def __init__(self, status: int, chain: Sequence[str]) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


# ApiError texts (vmm/src/api/mod.rs).
BOOT = "The VM could not boot"
CREATE = "The VM could not be created"
DELETE = "The VM could not be deleted"
INFO = "The VM info is not available"
PAUSE = "The VM could not be paused"
RESUME = "The VM could not resume"
SHUTDOWN = "The VM could not shutdown"
REBOOT = "The VM could not reboot"
RESIZE = "The VM could not be resized"
ADD_DISK = "The disk could not be added to the VM"
ADD_NET = "The network device could not be added to the VM"
REMOVE_DEVICE = "The device could not be removed from the VM"
POWER_BUTTON = "Error triggering power button"
NMI = "Error triggering NMI"
# VmError texts (vmm/src/vm.rs).
NOT_CREATED = "VM is not created"
MISSING_CONFIG = "VM config is missing"
ALREADY_CREATED = "VM is already created"
NOT_RUNNING = "VM is not running"
CONFIG_VALIDATION = "Failed to validate config"
DEVICE_MANAGER = "Error from device manager"


class VmFailure(Exception):
    """A VmError of Cloud Hypervisor: its text and the texts of its sources."""

    def __init__(self, *chain: str) -> None:
        super().__init__(": ".join(chain))
        self.chain = list(chain)


def api_error(action: str, *causes: str) -> ApiFailure:
    """HttpError::ApiError: "Error from API", the ApiError text, then its sources.

    404 when the VM has no config (VmNotCreated / VmMissingConfig), else 500.
    """
    status = 404 if causes and causes[0] in (NOT_CREATED, MISSING_CONFIG) else 500
    return ApiFailure(status, ["Error from API", action, *causes])


@contextmanager
def api_action(action: str) -> Iterator[None]:
    """Runs one API action: a VmFailure inside becomes that action's ApiError."""
    try:
        yield
    except VmFailure as e:
        raise api_error(action, *e.chain) from e


def os_error_text(e: OSError) -> str:
    """Rust's io::Error Display for an OS error."""
    return f"{e.strerror or os.strerror(e.errno or 0)} (os error {e.errno})"


# ---- JSON with positions, for serde-style messages -------------------------------------


class SerdeError(Exception):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


class JsonObject(dict[str, Any]):
    """A decoded JSON object that remembers where it and each member value ended."""

    end: int = 0
    value_ends: dict[str, int]


# The standard library's object parser, which the pure-Python scanner calls back.
_JSON_OBJECT: Callable[..., tuple[Any, int]] = getattr(json.decoder, "JSONObject")  # noqa: B009


def _parse_object(s_and_end: tuple[str, int], strict: bool, scan_once: Any,
                  object_hook: Any, object_pairs_hook: Any, memo: Any = None) -> Any:
    ends: list[int] = []

    def scan_recording_end(string: str, idx: int) -> Any:
        value, end = scan_once(string, idx)
        ends.append(end)
        return value, end

    pairs, end = _JSON_OBJECT(s_and_end, strict, scan_recording_end, None, list, memo)
    obj = JsonObject()
    obj.value_ends = {}
    for (key, value), value_end in zip(pairs, ends, strict=True):
        obj[key] = value
        obj.value_ends[key] = value_end
    obj.end = end
    return obj, end


def _position_decoder() -> json.JSONDecoder:
    decoder = json.JSONDecoder()
    # The pure-Python scanner calls the decoder's parse_object; the C one would not.
    setattr(decoder, "parse_object", _parse_object)  # noqa: B010
    py_make_scanner = getattr(json.scanner, "py_make_scanner")  # noqa: B009
    setattr(decoder, "scan_once", py_make_scanner(decoder))  # noqa: B010
    return decoder


def _line_column(text: str, end: int) -> tuple[int, int]:
    """serde_json's position: line and column of the last character read."""
    end = max(1, min(end, len(text)))
    line = text.count("\n", 0, end) + 1
    return line, end - (text.rfind("\n", 0, end) + 1)


_SYNTAX_MESSAGES = {
    "Expecting value": "expected value",
    "Expecting property name enclosed in double quotes": "key must be a string",
    "Expecting ',' delimiter": "expected `,` or `}`",
    "Expecting ':' delimiter": "expected `:`",
    "Extra data": "trailing characters",
}


def deserialize(raw: bytes, kind: Kind) -> Any:
    """Decode a request body against a schema; errors are 400 with serde's message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiFailure(400, ["Failed to deserialize JSON",
                               f"invalid unicode code point at line 1 column {e.start + 1}"]) from e
    try:
        value = _position_decoder().decode(text)
    except json.JSONDecodeError as e:
        message = _SYNTAX_MESSAGES.get(e.msg, e.msg[:1].lower() + e.msg[1:])
        if e.pos >= len(text.rstrip()):
            message = "EOF while parsing a value"
        line, column = _line_column(text, e.pos + 1)
        raise ApiFailure(400, ["Failed to deserialize JSON",
                               f"{message} at line {line} column {column}"]) from e
    try:
        return kind.decode(value, len(text))
    except SerdeError as e:
        line, column = _line_column(text, e.position)
        raise ApiFailure(400, ["Failed to deserialize JSON",
                               f"{e.message} at line {line} column {column}"]) from e


# ---- the config schema (vmm/src/vm_config.rs), as serde sees it ------------------------


def _unexpected(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return "sequence" if isinstance(value, list) else "map"


class Kind:
    expected = ""

    def decode(self, value: Any, end: int) -> Any:
        raise NotImplementedError

    def wrong_type(self, value: Any, end: int) -> SerdeError:
        return SerdeError(f"invalid type: {_unexpected(value)}, expected {self.expected}", end)


class Unsigned(Kind):
    def __init__(self, name: str, bits: int) -> None:
        self.expected = name
        self.limit = (1 << bits) - 1

    def decode(self, value: Any, end: int) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong_type(value, end)
        if not 0 <= value <= self.limit:
            raise SerdeError(f"invalid value: integer `{value}`, expected {self.expected}", end)
        return value


class Boolean(Kind):
    expected = "a boolean"

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, bool):
            raise self.wrong_type(value, end)
        return value


class Text(Kind):
    def __init__(self, expected: str = "a string") -> None:
        self.expected = expected

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, str):
            raise self.wrong_type(value, end)
        return value


class Variant(Kind):
    """A Rust enum of unit variants, spelled as a JSON string."""

    def __init__(self, name: str, variants: Sequence[str]) -> None:
        self.expected = f"enum {name}"
        self.variants = tuple(variants)

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, str):
            raise self.wrong_type(value, end)
        if value not in self.variants:
            names = [f"`{v}`" for v in self.variants]
            choice = (f"{names[0]} or {names[1]}" if len(names) == 2
                      else "one of " + ", ".join(names))
            raise SerdeError(f"unknown variant `{value}`, expected {choice}", end)
        return value


class ListOf(Kind):
    expected = "a sequence"

    def __init__(self, item: Kind) -> None:
        self.item = item

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, list):
            raise self.wrong_type(value, end)
        return [self.item.decode(v, getattr(v, "end", end)) for v in value]


class Maybe(Kind):
    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.expected = inner.expected

    def decode(self, value: Any, end: int) -> Any:
        return None if value is None else self.inner.decode(value, end)


class Anything(Kind):
    """A part of the config the simulator keeps as given."""

    def decode(self, value: Any, end: int) -> Any:
        return value


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    # REQUIRED, a value, or a callable that makes one. Options default to None.
    default: Any = None
    # PciDeviceCommonConfig's `iommu` is left out of the output when false.
    skip_if_false: bool = False


class Struct(Kind):
    def __init__(self, name: str, fields: Sequence[Field]) -> None:
        self.expected = f"struct {name}"
        self.fields = tuple(fields)
        self.by_name = {f.name: f for f in self.fields}

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, dict):
            raise self.wrong_type(value, end)
        object_end = getattr(value, "end", end)
        value_ends: dict[str, int] = getattr(value, "value_ends", {})
        decoded: dict[str, Any] = {}
        for key, item in value.items():
            spec = self.by_name.get(key)
            if spec is not None:  # serde skips unknown fields
                decoded[key] = spec.kind.decode(item, value_ends.get(key, object_end))
        for spec in self.fields:
            if spec.name in decoded:
                continue
            if spec.default is REQUIRED:
                raise SerdeError(f"missing field `{spec.name}`", object_end)
            default = spec.default() if callable(spec.default) else spec.default
            decoded[spec.name] = copy.deepcopy(default)
        # Output as serde would serialise it: None options and skipped falses left out.
        return {f.name: decoded[f.name] for f in self.fields
                if decoded[f.name] is not None
                and not (f.skip_if_false and decoded[f.name] is False)}

    def default_value(self, **given: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.decode(given, 0)
        return result


U8, U16, U32, U64, USIZE = (Unsigned("u8", 8), Unsigned("u16", 16), Unsigned("u32", 32),
                            Unsigned("u64", 64), Unsigned("usize", 64))
BOOL, STRING, PATH, ANY = Boolean(), Text(), Text("path string"), Anything()


def _random_mac() -> str:
    # MacAddr::local_random(): locally administered, unicast.
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] | 0x02) & 0xFE
    return ":".join(f"{o:02x}" for o in octets)


PCI_COMMON = (
    Field("id", Maybe(STRING)),
    Field("iommu", BOOL, False, skip_if_false=True),
    Field("pci_segment", U16, 0),
    Field("pci_device_id", Maybe(U8)),
)
TOKEN_BUCKET = Struct("TokenBucketConfig", [
    Field("size", U64, REQUIRED), Field("one_time_burst", Maybe(U64)),
    Field("refill_time", U64, REQUIRED)])
RATE_LIMITER = Struct("RateLimiterConfig", [
    Field("bandwidth", Maybe(TOKEN_BUCKET)), Field("ops", Maybe(TOKEN_BUCKET))])
CPU_TOPOLOGY = Struct("CpuTopology", [
    Field("threads_per_core", U16, REQUIRED), Field("cores_per_die", U16, REQUIRED),
    Field("dies_per_package", U16, REQUIRED), Field("packages", U16, REQUIRED)])
CPU_AFFINITY = Struct("CpuAffinity", [
    Field("vcpu", U32, REQUIRED), Field("host_cpus", ListOf(USIZE), REQUIRED)])
CPUS = Struct("CpusConfig", [
    Field("boot_vcpus", U32, REQUIRED), Field("max_vcpus", U32, REQUIRED),
    Field("topology", Maybe(CPU_TOPOLOGY)), Field("kvm_hyperv", BOOL, False),
    Field("max_phys_bits", U8, 46), Field("affinity", Maybe(ListOf(CPU_AFFINITY))),
    Field("features", ANY, dict), Field("nested", BOOL, True)])
HOTPLUG_METHOD = Variant("HotplugMethod", ["Acpi", "VirtioMem"])
MEMORY_ZONE = Struct("MemoryZoneConfig", [
    Field("id", STRING, REQUIRED), Field("size", U64, REQUIRED), Field("file", Maybe(PATH)),
    Field("shared", BOOL, False), Field("hugepages", BOOL, False),
    Field("hugepage_size", Maybe(U64)), Field("host_numa_node", Maybe(U32)),
    Field("hotplug_size", Maybe(U64)), Field("hotplugged_size", Maybe(U64)),
    Field("prefault", BOOL, False)])
MEMORY = Struct("MemoryConfig", [
    Field("size", U64, REQUIRED), Field("mergeable", BOOL, False),
    Field("hotplug_method", HOTPLUG_METHOD, "Acpi"), Field("hotplug_size", Maybe(U64)),
    Field("hotplugged_size", Maybe(U64)), Field("shared", BOOL, False),
    Field("hugepages", BOOL, False), Field("hugepage_size", Maybe(U64)),
    Field("prefault", BOOL, False), Field("zones", Maybe(ListOf(MEMORY_ZONE))),
    Field("thp", BOOL, True)])
PAYLOAD = Struct("PayloadConfig", [
    Field("firmware", Maybe(PATH)), Field("kernel", Maybe(PATH)),
    Field("cmdline", Maybe(STRING)), Field("initramfs", Maybe(PATH))])
IMAGE_TYPE = Variant("ImageType", ["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"])
DISK = Struct("DiskConfig", [
    *PCI_COMMON, Field("path", Maybe(PATH)), Field("readonly", BOOL, False),
    Field("direct", BOOL, False), Field("num_queues", USIZE, 1), Field("queue_size", U16, 128),
    Field("vhost_user", BOOL, False), Field("vhost_socket", Maybe(STRING)),
    Field("rate_limit_group", Maybe(STRING)),
    Field("rate_limiter_config", Maybe(RATE_LIMITER)),
    Field("disable_io_uring", BOOL, False), Field("disable_aio", BOOL, False),
    Field("serial", Maybe(STRING)), Field("backing_files", BOOL, False),
    Field("sparse", BOOL, True), Field("image_type", IMAGE_TYPE, "Unknown")])
NET = Struct("NetConfig", [
    *PCI_COMMON, Field("tap", Maybe(STRING)), Field("ip", Maybe(STRING)),
    Field("mask", Maybe(STRING)), Field("mac", STRING, _random_mac),
    Field("host_mac", Maybe(STRING)), Field("mtu", Maybe(U16)),
    Field("num_queues", USIZE, 2), Field("queue_size", U16, 256),
    Field("vhost_user", BOOL, False), Field("vhost_socket", Maybe(STRING)),
    Field("vhost_mode", Variant("VhostMode", ["Client", "Server"]), "Client"),
    Field("rate_limiter_config", Maybe(RATE_LIMITER)),
    Field("offload_tso", BOOL, True), Field("offload_ufo", BOOL, True),
    Field("offload_csum", BOOL, True)])
RNG = Struct("RngConfig", [*PCI_COMMON, Field("src", PATH, REQUIRED)])
CONSOLE_MODE = Variant("ConsoleOutputMode", ["Off", "Pty", "Tty", "File", "Socket", "Null"])
SERIAL = Struct("SerialConfig", [
    Field("file", Maybe(PATH)), Field("mode", CONSOLE_MODE, REQUIRED),
    Field("socket", Maybe(PATH))])
CONSOLE = Struct("ConsoleConfig", [
    Field("file", Maybe(PATH)), Field("mode", CONSOLE_MODE, REQUIRED),
    Field("socket", Maybe(PATH)), *PCI_COMMON])
NUMA = Struct("NumaConfig", [
    Field("guest_numa_id", U32, REQUIRED), Field("cpus", Maybe(ListOf(U32))),
    Field("distances", Maybe(ANY)), Field("memory_zones", Maybe(ListOf(STRING))),
    Field("pci_segments", Maybe(ANY)), Field("device_id", Maybe(STRING))])
_OPTIONAL_PASSTHROUGH = ("rate_limit_groups", "balloon", "generic_vhost_user", "fs", "pmem",
                         "devices", "user_devices", "vdpa", "vsock", "rtc", "pci_segments",
                         "platform", "tpm", "landlock_rules")
VM_CONFIG = Struct("VmConfig", [
    Field("cpus", CPUS, lambda: CPUS.default_value(boot_vcpus=1, max_vcpus=1)),
    Field("memory", MEMORY, lambda: MEMORY.default_value(size=512 << 20)),
    Field("payload", Maybe(PAYLOAD)),
    Field("disks", Maybe(ListOf(DISK))),
    Field("net", Maybe(ListOf(NET))),
    Field("rng", RNG, lambda: RNG.default_value(src="/dev/urandom")),
    Field("serial", SERIAL, lambda: SERIAL.default_value(mode="Null")),
    Field("console", CONSOLE, lambda: CONSOLE.default_value(mode="Tty")),
    Field("debug_console", ANY, lambda: {"mode": "Off", "iobase": 233}),
    Field("numa", Maybe(ListOf(NUMA))),
    Field("pvpanic", BOOL, False), Field("iommu", BOOL, False),
    Field("watchdog", BOOL, False), Field("landlock_enable", BOOL, False),
    *(Field(name, Maybe(ANY)) for name in _OPTIONAL_PASSTHROUGH),
])
RESIZE_DATA = Struct("VmResizeData", [
    Field("desired_vcpus", Maybe(U32)), Field("desired_ram", Maybe(U64)),
    Field("desired_balloon", Maybe(U64))])
REMOVE_DEVICE_DATA = Struct("VmRemoveDeviceData", [Field("id", STRING, REQUIRED)])


# ---- config validation at boot (VmConfig::validate, vmm/src/config.rs) -----------------


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validation_error(config: dict[str, Any]) -> list[str] | None:
    """The error chain below "Failed to validate config", or None when the config is valid."""
    payload = config.get("payload")
    if not payload or ("kernel" not in payload and "firmware" not in payload):
        return ["Payload configuration is not bootable",
                "No bootitem provided: neither firmware nor kernel"]
    if "kernel" in payload and "firmware" in payload:
        return ["Payload configuration is not bootable",
                "Specifying a kernel is not supported when a firmware is provided"]
    for console in (config["console"], config["serial"]):
        if console["mode"] == "File" and "file" not in console:
            return ["Path missing when using file console mode"]
    cpus, memory = config["cpus"], config["memory"]
    if cpus["max_vcpus"] < cpus["boot_vcpus"]:
        return [f"Max CPUs ({cpus['max_vcpus']}) lower than boot CPUs ({cpus['boot_vcpus']})"]
    if cpus["max_vcpus"] > MAX_SUPPORTED_CPUS:
        return [f"Too many CPUs: specified {cpus['max_vcpus']} but {MAX_SUPPORTED_CPUS} "
                "is the limit"]
    shared_memory = memory["shared"] or memory["hugepages"]
    ids: set[str] = set()

    def identifier_error(device: dict[str, Any]) -> list[str] | None:
        device_id = device.get("id")
        if device_id is None:
            return None
        if device_id.startswith("__"):
            return [f"Identifier {device_id} is not invalid"]
        if device_id in ids:
            return [f"Identifier {device_id} is not unique"]
        ids.add(device_id)
        return None

    for disk in config.get("disks") or []:
        if "vhost_socket" in disk and "path" in disk:
            return ["Disk path and vhost socket both provided"]
        if disk["vhost_user"] and not shared_memory:
            return ["Using vhost-user requires using shared memory or huge pages"]
        if disk["vhost_user"] and "vhost_socket" not in disk:
            return ["No socket provided when using vhost-user"]
        if disk["num_queues"] > cpus["boot_vcpus"]:
            return [f"Queue count ({disk['num_queues']}) must not exceed boot vCPUs "
                    f"({cpus['boot_vcpus']})"]
        if not _is_power_of_two(disk["queue_size"]):
            return [f"Queue size must be a power of 2 no greater than 32768: "
                    f"{disk['queue_size']}"]
        if error := identifier_error(disk):
            return error
    for net in config.get("net") or []:
        if net["vhost_user"] and not shared_memory:
            return ["Using vhost-user requires using shared memory or huge pages"]
        if net["vhost_user"] and "vhost_socket" not in net:
            return ["No socket provided when using vhost-user"]
        if error := identifier_error(net):
            return error
    for device in (config["rng"], config["console"]):
        if error := identifier_error(device):
            return error
    topology = cpus.get("topology")
    if topology:
        parts = (topology["threads_per_core"], topology["cores_per_die"],
                 topology["dies_per_package"], topology["packages"])
        if 0 in parts:
            return ["No part of the CPU topology can be zero"]
        if topology["threads_per_core"] > 2:
            return ["CPU topology supports at most 2 threads per core"]
        if parts[0] * parts[1] * parts[2] * parts[3] != cpus["max_vcpus"]:
            return ["Product of CPU topology parts does not match maximum vCPU"]
    if "hugepage_size" in memory:
        if not memory["hugepages"]:
            return ["Huge page size specified but huge pages not enabled"]
        if not _is_power_of_two(memory["hugepage_size"]):
            return [f"Huge page size is not power of 2: {memory['hugepage_size']}"]
    if memory["shared"] and memory["mergeable"]:
        return ["Invalid to set both 'mergeable' and 'shared' for memory"]
    return None


def memory_actual_size(config: dict[str, Any]) -> int:
    """vm.info's memory_actual_size for ACPI hotplug: the configured RAM and zones."""
    memory = config["memory"]
    return int(memory["size"] + sum(zone["size"] for zone in memory.get("zones") or []))


# ---- the serial port ------------------------------------------------------------------


class SerialPort:
    """Where the guest's serial output goes (a ConsoleTransport of Cloud Hypervisor)."""

    def __init__(self, mode: str, path: str | None) -> None:
        self._fd: int | None = None
        self._owned = False
        if mode == "File" and path is not None:
            # File::create: a new VM (and each reboot) starts with an empty file.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._owned = True
        elif mode == "Tty":
            self._fd = sys.stdout.fileno()

    def write_line(self, line: str) -> None:
        if self._fd is not None:
            try:
                os.write(self._fd, (line + "\n").encode())
            except OSError:
                pass

    def close(self) -> None:
        if self._owned and self._fd is not None:
            os.close(self._fd)
        self._fd = None


def open_serial(config: dict[str, Any]) -> SerialPort:
    serial = config["serial"]
    try:
        return SerialPort(serial["mode"], serial.get("file"))
    except OSError as e:
        raise VmFailure("Error creating console devices", "Error creating console device",
                        os_error_text(e)) from e


# ---- the booted VM --------------------------------------------------------------------


@dataclass
class Device:
    id: str
    kind: str  # VirtioDeviceType's Display text: "block", "net", "rng", "console"
    slot: int
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def bdf(self) -> str:
        return f"0000:00:{self.slot:02x}.0"


def _counters(kind: str) -> dict[str, int]:
    if kind == "block":
        return dict.fromkeys(
            ("read_bytes", "write_bytes", "read_ops", "write_ops", "read_latency_min",
             "read_latency_max", "read_latency_avg", "write_latency_min",
             "write_latency_max", "write_latency_avg"), 0)
    if kind == "net":
        return dict.fromkeys(("rx_bytes", "rx_frames", "tx_bytes", "tx_frames"), 0)
    return {}


class Guest:
    """One booted VM (Cloud Hypervisor's `Vm`): its devices, vCPUs, RAM and guest OS.

    Built like Vm::new: the config is validated, the devices are created (disks
    opened, ids named `_disk0`, `_net1`, ... from one counter and written back
    into the config), then the initramfs and kernel are opened.
    """

    def __init__(self, config: dict[str, Any], serial: SerialPort) -> None:
        chain = validation_error(config)
        if chain is not None:
            raise VmFailure(CONFIG_VALIDATION, *chain)
        self.config = config
        self.serial = serial
        self.state = "Running"
        self.devices: dict[str, Device] = {}
        self._next_id = 0
        self._boot_ids = {d["id"] for key in ("disks", "net") for d in config.get(key) or []
                          if "id" in d}
        self.boot_ram = config["memory"]["size"]
        self.current_ram = self.boot_ram
        self.hotplug_slots_used = 0
        self.unplug_pending_until = 0.0
        self.power_off_pending = False
        if config["console"]["mode"] != "Off":
            self._plug("__console", "console")
        for disk in config.get("disks") or []:
            self.attach_disk(disk)
        for net in config.get("net") or []:
            self.attach_net(net)
        self._plug("__rng", "rng")
        payload = config["payload"]
        for key in ("initramfs", "kernel"):
            if key in payload:
                try:
                    with open(payload[key], "rb"):
                        pass
                except OSError as e:
                    raise VmFailure(f"Cannot open {key} file", os_error_text(e)) from e

    @property
    def cmdline(self) -> str:
        return str(self.config["payload"].get("cmdline", ""))

    @property
    def ignores_power_button(self) -> bool:
        """A guest booted with acpi=off has no ACPI, so no power button."""
        return "acpi=off" in self.cmdline.split()

    def start(self) -> None:
        self.serial.write_line(f"[    0.000000] Command line: {self.cmdline}")
        for disk in self.config.get("disks") or []:
            self._probe_disk(disk)
        self.serial.write_line(GUEST_READY_LINE)

    def _probe_disk(self, disk: dict[str, Any]) -> None:
        # What a booting kernel does first with a disk: read its first sectors.
        device = self.devices.get(disk.get("id", ""))
        if device is None or "path" not in disk:
            return
        try:
            with open(disk["path"], "rb") as f:
                data = f.read(DISK_PROBE_BYTES)
        except OSError:
            return
        device.counters["read_ops"] += 1
        device.counters["read_bytes"] += len(data)

    def _device_name(self, prefix: str) -> str:
        while True:
            name = f"{prefix}{self._next_id}"
            self._next_id += 1
            if name not in self._boot_ids and name not in self.devices:
                return name

    def _plug(self, device_id: str, kind: str) -> Device:
        used = {d.slot for d in self.devices.values()}
        slot = next(s for s in range(1, 32) if s not in used)
        device = Device(device_id, kind, slot, _counters(kind))
        self.devices[device_id] = device
        return device

    def attach_disk(self, disk: dict[str, Any]) -> Device:
        """Open the disk image, as the block device factory does, and plug it in."""
        if "path" in disk:
            flags = os.O_RDONLY if disk["readonly"] else os.O_RDWR
            try:
                os.close(os.open(disk["path"], flags))
            except OSError as e:
                raise VmFailure(DEVICE_MANAGER, "Cannot open disk path",
                                f"I/O error (path={disk['path']} op=open)",
                                os_error_text(e)) from e
        if "id" not in disk:
            disk["id"] = self._device_name("_disk")
        return self._plug(disk["id"], "block")

    def attach_net(self, net: dict[str, Any]) -> Device:
        if "id" not in net:
            net["id"] = self._device_name("_net")
        return self._plug(net["id"], "net")

    def unplug(self, device_id: str) -> None:
        device = self.devices.get(device_id)
        if device is None:
            raise VmFailure(DEVICE_MANAGER, "Failed to find device corresponding to the "
                            f"given identifier: {device_id}")
        if device.kind not in ("block", "net"):
            raise VmFailure(DEVICE_MANAGER, "Not allowed to remove this type of device from "
                            f"the VM: {device.kind}")
        # This guest ejects the device at once; a real one acknowledges through ACPI.
        del self.devices[device_id]

    def resize_vcpus(self, desired: int, unplug_seconds: float) -> None:
        cpus = self.config["cpus"]
        if desired == cpus["boot_vcpus"]:
            return
        if desired < 1:
            raise VmFailure("Error from CPU manager", "Requested zero vCPUs")
        if time.monotonic() < self.unplug_pending_until:
            raise ApiFailure(429, ["Too Many Requests"])
        if desired > cpus["max_vcpus"]:
            raise VmFailure("Error from CPU manager", "Requested vCPUs exceed maximum")
        if desired < cpus["boot_vcpus"]:
            self.unplug_pending_until = time.monotonic() + unplug_seconds
        cpus["boot_vcpus"] = desired

    def resize_ram(self, desired: int) -> None:
        memory = self.config["memory"]
        if memory.get("zones"):
            raise VmFailure("Memory manager error", "Impossible to resize guest memory if it "
                            "is backed by user defined memory regions")
        if desired > self.current_ram and memory["hotplug_method"] == "Acpi":
            if self.hotplug_slots_used >= HOTPLUG_SLOTS:
                raise VmFailure("Memory manager error", "No ACPI slot available")
            if (desired - self.current_ram) % HOTPLUG_ALIGN:
                raise VmFailure("Memory manager error",
                                "The requested hotplug memory addition is not a valid size")
            if desired > self.boot_ram + memory.get("hotplug_size", 0):
                raise VmFailure("Memory manager error",
                                "Not enough space in the hotplug RAM region")
            self.hotplug_slots_used += 1
            self.current_ram = desired
        # Cloud Hypervisor records the size whether or not the guest's RAM changed.
        memory["size"] = desired

    def device_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for device in self.devices.values():
            pci_id = f"_virtio-pci-{device.id}"
            tree[device.id] = {"id": device.id, "resources": [], "parent": pci_id,
                               "children": []}
            tree[pci_id] = {"id": pci_id, "resources": [], "children": [device.id],
                            "pci_bdf": device.bdf}
        return tree

    def counters(self) -> dict[str, dict[str, int]]:
        return {d.id: dict(d.counters) for d in self.devices.values() if d.counters}

    def stop(self) -> None:
        self.state = "Shutdown"
        self.serial.close()


# ---- the VMM: Cloud Hypervisor's RequestHandler (vmm/src/lib.rs) -----------------------


class Vmm:
    """The VMM's state. Every API request runs under its lock, one at a time, as on
    Cloud Hypervisor's single VMM thread."""

    def __init__(self, no_shutdown: bool, unplug_seconds: float,
                 request_exit: Callable[[], None]) -> None:
        self.lock = threading.RLock()
        self.no_shutdown = no_shutdown
        self.unplug_seconds = unplug_seconds
        self.request_exit = request_exit
        self.config: dict[str, Any] | None = None
        self.vm: Guest | None = None
        self.serial: SerialPort | None = None

    def _require_config(self) -> dict[str, Any]:
        if self.config is None:
            raise VmFailure(NOT_CREATED)
        return self.config

    def _require_vm(self, missing: str = NOT_RUNNING) -> Guest:
        if self.vm is None:
            raise VmFailure(missing)
        return self.vm

    # ---- lifecycle

    def vm_create(self, config: dict[str, Any]) -> None:
        with api_action(CREATE):
            if self.config is not None:
                raise VmFailure(ALREADY_CREATED)
            # Stored first: a failure to open the serial output leaves the config in place.
            self.config = config
            self.serial = open_serial(config)

    def vm_boot(self) -> None:
        with api_action(BOOT):
            if self.vm is not None:
                raise VmFailure(ALREADY_CREATED)
            if self.config is None:
                raise VmFailure(MISSING_CONFIG)
            if self.serial is None:
                self.serial = open_serial(self.config)
            self.vm = Guest(self.config, self.serial)
            self.vm.start()

    def vm_pause(self) -> None:
        with api_action(PAUSE):
            vm = self._require_vm()
            if vm.state != "Running":
                raise VmFailure("Cannot pause VM", "Failed to pause migratable component",
                                f"Invalid transition: InvalidStateTransition({vm.state}, Paused)")
            vm.state = "Paused"

    def vm_resume(self) -> None:
        with api_action(RESUME):
            vm = self._require_vm()
            if vm.state != "Paused":
                raise VmFailure("Cannot resume VM", "Failed to resume migratable component",
                                f"Invalid transition: InvalidStateTransition({vm.state}, "
                                "Running)")
            vm.state = "Running"
            if vm.power_off_pending:
                self._schedule_power_off(vm)

    def vm_shutdown(self) -> None:
        with api_action(SHUTDOWN):
            self._require_vm()
            self._drop_vm()

    def _drop_vm(self) -> None:
        # The Vm object goes away with its serial output; the config stays, so
        # vm.info says "Created" and vm.boot starts it again.
        if self.vm is not None:
            self.vm.stop()
        elif self.serial is not None:
            self.serial.close()
        self.vm = None
        self.serial = None

    def vm_reboot(self) -> None:
        with api_action(REBOOT):
            self._require_vm(missing=NOT_CREATED)
            self._drop_vm()
            config = self._require_config()
            self.serial = open_serial(config)
            self.vm = Guest(config, self.serial)
            self.vm.start()

    def vm_delete(self) -> None:
        if self.config is not None:
            self._drop_vm()
            self.config = None

    def vmm_shutdown(self) -> None:
        self.vm_delete()

    # ---- information

    def vm_info(self) -> dict[str, Any]:
        with api_action(INFO):
            config = self._require_config()
            info: dict[str, Any] = {
                "config": config,
                "state": self.vm.state if self.vm is not None else "Created",
                "memory_actual_size": memory_actual_size(config),
            }
            if self.vm is not None:
                info["device_tree"] = self.vm.device_tree()
            return info

    def vm_counters(self) -> dict[str, Any]:
        with api_action(INFO):
            return self._require_vm().counters()

    @staticmethod
    def vmm_ping() -> dict[str, Any]:
        return {"build_version": BUILD_VERSION, "version": VERSION, "pid": os.getpid(),
                "features": ["kvm", "io_uring"]}

    # ---- the power button

    def vm_power_button(self) -> None:
        with api_action(POWER_BUTTON):
            vm = self._require_vm()
        if vm.ignores_power_button:
            return
        vm.power_off_pending = True
        if vm.state == "Running":
            self._schedule_power_off(vm)

    def _schedule_power_off(self, vm: Guest) -> None:
        timer = threading.Timer(GUEST_POWEROFF_DELAY, self._guest_powered_off, (vm,))
        timer.daemon = True
        timer.start()

    def _guest_powered_off(self, vm: Guest) -> None:
        with self.lock:
            if self.vm is not vm or vm.state != "Running":
                return
            vm.serial.write_line(f"[    1.000000] {GUEST_POWEROFF_LINE}")
            if self.no_shutdown:
                self._drop_vm()
                return
            self.vmm_shutdown()
        self.request_exit()

    # ---- resources

    def vm_resize(self, data: dict[str, Any]) -> None:
        with api_action(RESIZE):
            config = self._require_config()
            if self.vm is None:
                if "desired_vcpus" in data:
                    config["cpus"]["boot_vcpus"] = data["desired_vcpus"]
                if "desired_ram" in data:
                    config["memory"]["size"] = data["desired_ram"]
                return
            if "desired_vcpus" in data:
                self.vm.resize_vcpus(data["desired_vcpus"], self.unplug_seconds)
            if "desired_ram" in data:
                self.vm.resize_ram(data["desired_ram"])

    def vm_add_disk(self, disk: dict[str, Any]) -> dict[str, Any] | None:
        with api_action(ADD_DISK):
            return self._add_device("disks", disk)

    def vm_add_net(self, net: dict[str, Any]) -> dict[str, Any] | None:
        with api_action(ADD_NET):
            return self._add_device("net", net)

    def _add_device(self, key: str, device: dict[str, Any]) -> dict[str, Any] | None:
        config = self._require_config()
        trial = copy.deepcopy(config)
        trial[key] = [*(trial.get(key) or []), copy.deepcopy(device)]
        chain = validation_error(trial)
        if chain is not None:
            raise VmFailure(CONFIG_VALIDATION, *chain)
        if self.vm is None:
            config[key] = [*(config.get(key) or []), device]
            return None
        plugged = self.vm.attach_disk(device) if key == "disks" else self.vm.attach_net(device)
        config[key] = [*(config.get(key) or []), device]
        return {"id": plugged.id, "bdf": plugged.bdf}

    def vm_remove_device(self, device_id: str) -> None:
        with api_action(REMOVE_DEVICE):
            if self.vm is not None:
                self.vm.unplug(device_id)
                self._remove_from_config(device_id)
                return
            self._require_config()
            if not self._remove_from_config(device_id):
                raise VmFailure(f"No device with id {json.dumps(device_id)} to remove")

    def _remove_from_config(self, device_id: str) -> bool:
        config = self._require_config()
        for key in ("disks", "net"):
            devices = config.get(key) or []
            kept = [d for d in devices if d.get("id") != device_id]
            if len(kept) != len(devices):
                if kept:
                    config[key] = kept
                else:
                    config.pop(key)
                return True
        return False

    def vm_nmi(self) -> None:
        with api_action(NMI):
            self._require_vm()


# ---- HTTP routes (vmm/src/api/http/mod.rs and http_endpoint.rs) ------------------------


@dataclass(frozen=True)
class Route:
    """How one endpoint handles methods and bodies, and what it calls."""

    # "action": PUT, no body; "body": PUT with a JSON body; "get": GET only;
    # "create"/"info"/"ping"/"vmm_shutdown": the endpoints with their own handlers.
    style: str
    call: Callable[[Vmm, Any], Any]
    schema: Kind | None = None


def _not_simulated(action: str) -> Callable[[Vmm, Any], Any]:
    def call(vmm: Vmm, body: Any) -> Any:
        raise api_error(action, "not implemented by the Cloud Hypervisor API simulator")
    return call


ROUTES: dict[str, Route] = {
    "/vm.create": Route("create", lambda vmm, body: vmm.vm_create(body), VM_CONFIG),
    "/vm.boot": Route("action", lambda vmm, _: vmm.vm_boot()),
    "/vm.pause": Route("action", lambda vmm, _: vmm.vm_pause()),
    "/vm.resume": Route("action", lambda vmm, _: vmm.vm_resume()),
    "/vm.shutdown": Route("action", lambda vmm, _: vmm.vm_shutdown()),
    "/vm.reboot": Route("action", lambda vmm, _: vmm.vm_reboot()),
    "/vm.delete": Route("action", lambda vmm, _: vmm.vm_delete()),
    "/vm.power-button": Route("action", lambda vmm, _: vmm.vm_power_button()),
    "/vm.nmi": Route("action", lambda vmm, _: vmm.vm_nmi()),
    "/vm.info": Route("info", lambda vmm, _: vmm.vm_info()),
    "/vm.counters": Route("get", lambda vmm, _: vmm.vm_counters()),
    "/vmm.ping": Route("ping", lambda vmm, _: vmm.vmm_ping()),
    "/vmm.shutdown": Route("vmm_shutdown", lambda vmm, _: vmm.vmm_shutdown()),
    "/vm.resize": Route("body", lambda vmm, body: vmm.vm_resize(body), RESIZE_DATA),
    "/vm.add-disk": Route("body", lambda vmm, body: vmm.vm_add_disk(body), DISK),
    "/vm.add-net": Route("body", lambda vmm, body: vmm.vm_add_net(body), NET),
    "/vm.remove-device": Route("body", lambda vmm, body: vmm.vm_remove_device(body["id"]),
                               REMOVE_DEVICE_DATA),
    "/vm.add-device": Route("body", _not_simulated("The device could not be added to the VM")),
    "/vm.add-user-device": Route(
        "body", _not_simulated("The user device could not be added to the VM")),
    "/vm.add-fs": Route("body", _not_simulated("The fs could not be added to the VM")),
    "/vm.add-generic-vhost-user": Route("body", _not_simulated(
        "The generic vhost-user device could not be added to the VM")),
    "/vm.add-pmem": Route("body", _not_simulated("The pmem device could not be added to the VM")),
    "/vm.add-vdpa": Route("body", _not_simulated("The vDPA device could not be added to the VM")),
    "/vm.add-vsock": Route("body",
                           _not_simulated("The vsock device could not be added to the VM")),
    "/vm.resize-disk": Route("body", _not_simulated("The disk could not be resized")),
    "/vm.resize-zone": Route("body", _not_simulated("The memory zone could not be resized")),
    "/vm.snapshot": Route("body", _not_simulated("The VM could not be snapshotted")),
    "/vm.restore": Route("body", _not_simulated("The VM could not be restored")),
    "/vm.send-migration": Route("body",
                                _not_simulated("Error dispatching the migration worker")),
    "/vm.receive-migration": Route("body", _not_simulated("Error receiving migration")),
}


def to_json(value: Any) -> str:
    """Compact, as serde_json::to_string writes it."""
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class Reply:
    status: int
    body: str | None = None  # None: no body at all


def _error_reply(e: ApiFailure) -> Reply:
    return Reply(e.status, to_json(e.chain))


BAD_REQUEST = ApiFailure(400, ["Bad Request"])


def handle(vmm: Vmm, method: str, path: str, raw_body: bytes | None) -> Reply:
    """One request, as Cloud Hypervisor's HTTP thread and VMM thread answer it."""
    route = ROUTES.get(path[len(API_ROOT):]) if path.startswith(API_ROOT + "/") else None
    if route is None:
        return _error_reply(ApiFailure(404, ["Not Found"]))
    try:
        with vmm.lock:
            return _dispatch(vmm, route, method, raw_body)
    except ApiFailure as e:
        return _error_reply(e)
    except Exception:  # a simulator bug must not kill the connection silently
        return _error_reply(ApiFailure(500, ["Internal Server Error"]))


def _dispatch(vmm: Vmm, route: Route, method: str, raw_body: bytes | None) -> Reply:
    if route.style in ("info", "ping", "get"):
        if method != "GET":
            # The generic handler answers an empty 400 for methods other than GET/PUT.
            if route.style == "get" and method != "PUT":
                return Reply(400)
            raise BAD_REQUEST
        return Reply(200, to_json(route.call(vmm, None)))
    if route.style in ("create", "vmm_shutdown"):
        if method != "PUT":
            raise BAD_REQUEST
        if route.style == "vmm_shutdown":
            route.call(vmm, None)
            return Reply(200, "")
        if raw_body is None:
            return Reply(400)
        assert route.schema is not None
        route.call(vmm, deserialize(raw_body, route.schema))
        return Reply(204)
    if method == "GET":
        raise BAD_REQUEST
    if method != "PUT":
        return Reply(400)
    if route.style == "action":
        if raw_body is not None:
            raise BAD_REQUEST
        route.call(vmm, None)
        return Reply(204)
    if raw_body is None:
        raise BAD_REQUEST
    body = deserialize(raw_body, route.schema) if route.schema is not None else None
    result = route.call(vmm, body)
    return Reply(204) if result is None else Reply(200, to_json(result))


# ---- the HTTP server on the Unix socket -----------------------------------------------


class ApiRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def __getattr__(self, name: str) -> Any:
        # micro_http parses only GET, PUT and PATCH; anything else is refused before routing.
        if name.startswith("do_"):
            return self._refuse_method
        raise AttributeError(name)

    def _refuse_method(self) -> None:
        self._send(Reply(400, MICRO_HTTP_BAD_METHOD))
        self.close_connection = True

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else None
        path = self.path.split("?", 1)[0]
        reply = handle(self.server.vmm, method, path, raw)
        self._send(reply)
        self.server.log(f"{method} {path} -> {reply.status}")
        if method == "PUT" and path == API_ROOT + "/vmm.shutdown" and reply.status == 200:
            self.close_connection = True
            self.server.request_exit()

    def _send(self, reply: Reply) -> None:
        payload = (reply.body or "").encode()
        self.send_response_only(reply.status, "")
        self.send_header("Server", SERVER_HEADER)
        self.send_header("Connection", "keep-alive")
        self.send_header("Content-Type", "application/json")
        if reply.status != 204:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: Path, vmm_factory: Callable[[ApiServer], Vmm],
                 log_file: Path | None) -> None:
        self.socket_path = socket_path
        self.exit_requested = threading.Event()
        self.started = time.monotonic()
        self._log = open(log_file, "a", buffering=1) if log_file else None
        # Bound in place, as Cloud Hypervisor does: a client may see the path a moment
        # before the server listens, and must retry a refused connection.
        super().__init__(str(socket_path), ApiRequestHandler)
        self.vmm = vmm_factory(self)

    def request_exit(self) -> None:
        self.exit_requested.set()

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log.write(f"cloud-hypervisor: {time.monotonic() - self.started:.6f}s: "
                            f"<sim> {message}\n")


# ---- command line ---------------------------------------------------------------------


def _socket_path(value: str) -> Path:
    options = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    if "fd" in options:
        raise SystemExit("cloud-hypervisor-sim: --api-socket fd=N is not supported; "
                         "use path=PATH")
    return Path(options.get("path", value))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-hypervisor-sim",
        description="Cloud Hypervisor v53.0 HTTP API simulator.")
    parser.add_argument("--api-socket", help="path=<path> (or just <path>)")
    parser.add_argument("--no-shutdown", action="store_true",
                        help="do not exit the VMM when the guest shuts down")
    parser.add_argument("-v", action="count", default=0, help="ignored")
    parser.add_argument("--log-file", type=Path, help="where to log API requests")
    parser.add_argument("--seccomp", help="ignored")
    parser.add_argument("--gdb", help="accepted and ignored: the simulator has no GDB stub")
    parser.add_argument("-V", "--version", action="store_true")
    return parser


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"cloud-hypervisor {BUILD_VERSION} (API simulator)")
        return 0
    if not args.api_socket:
        print("cloud-hypervisor-sim: --api-socket is required: the simulator only runs VMs "
              "defined through the API", file=sys.stderr)
        return 1
    socket_path = _socket_path(args.api_socket)
    if socket_path.exists():
        if _socket_in_use(socket_path):
            print(f"cloud-hypervisor-sim: API socket {socket_path} is in use by another "
                  "instance", file=sys.stderr)
            return 1
        socket_path.unlink()  # stale, left by a crash
    unplug_seconds = float(os.environ.get(UNPLUG_SECONDS_ENV, DEFAULT_UNPLUG_SECONDS))
    try:
        server = ApiServer(
            socket_path,
            lambda srv: Vmm(args.no_shutdown, unplug_seconds, srv.request_exit),
            args.log_file)
    except OSError as e:
        print(f"cloud-hypervisor-sim: cannot serve the API on {socket_path}: "
              f"{os_error_text(e)}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        server.request_exit()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True, name="http-server").start()
    while not server.exit_requested.wait(0.5):
        pass
    with server.vmm.lock:
        server.vmm.vm_delete()
    try:
        socket_path.unlink()
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
