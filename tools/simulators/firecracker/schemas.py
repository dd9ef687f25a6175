"""The request bodies Firecracker v1.14.2 accepts, as serde schemas.

Each struct lists its fields in the Rust declaration order (that order shows in
"unknown field ..., expected one of ..." errors), with the Rust integer widths,
defaults and `deny_unknown_fields` settings of the v1.14.2 sources.
"""

from __future__ import annotations

from typing import Any

from tools.simulators.firecracker.json_reader import custom
from tools.simulators.firecracker.serde import (
    AnyValue,
    Bool,
    Enum,
    Opt,
    Schema,
    Seq,
    Str,
    Struct,
    UInt,
    Validated,
    field,
)

U8 = UInt("u8", 8)
U16 = UInt("u16", 16)
U32 = UInt("u32", 32)
U64 = UInt("u64", 64)
USIZE = UInt("usize", 64)
STRING = Str()
PATH = Str("path string")


# ---- Rust parsing helpers with Rust's error texts ------------------------------------


class RustParseIntError(ValueError):
    """core::num::ParseIntError: Display text and Debug text."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


def parse_rust_uint(text: str, radix: int, bits: int) -> int:
    """u32::from_str_radix and friends (a leading '+' is allowed, nothing else)."""
    if not text:
        raise RustParseIntError("Empty", "cannot parse integer from empty string")
    digits = text[1:] if text[0] == "+" else text
    valid = "0123456789abcdefghijklmnopqrstuvwxyz"[:radix]
    if not digits or any(c.lower() not in valid for c in digits):
        raise RustParseIntError("InvalidDigit", "invalid digit found in string")
    value = int(digits, radix)
    if value >= 2**bits:
        raise RustParseIntError("PosOverflow", "number too large to fit in target type")
    return value


def parse_mac(text: str) -> str:
    parts = text.split(":")
    hexdigits = "0123456789abcdefABCDEF"
    if len(parts) != 6 or any(len(p) != 2 or not set(p) <= set(hexdigits) for p in parts):
        raise custom("The provided MAC address is invalid.")
    return ":".join(p.lower() for p in parts)


def parse_ipv4(text: str) -> str:
    parts = text.split(".")
    ok = len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and (p == "0" or not p.startswith("0"))
        and int(p) <= 255 for p in parts)
    if not ok:
        raise custom("invalid IPv4 address syntax")
    return text


LEVELS = {"off": "Off", "trace": "Trace", "debug": "Debug", "info": "Info",
          "warn": "Warn", "warning": "Warn", "error": "Error"}


def parse_level(text: str) -> str:
    level = LEVELS.get(text.lower())
    if level is None:
        raise custom("Invalid LevelFilter")
    return level


def parse_kvm_capability(text: str) -> str:
    try:
        parse_rust_uint(text.removeprefix("!"), 10, 32)
    except RustParseIntError as e:
        raise custom(f"Failed to parse string [{text}] as a kvm capability - can not "
                     f"convert to numeric: {e.text}") from None
    return text


def prefixed_number(bits: int) -> Any:
    def parse(text: str) -> int:
        if text.startswith("0b"):
            radix, digits = 2, text[2:]
        elif text.startswith("0x"):
            radix, digits = 16, text[2:]
        else:
            raise custom(
                f"No supported number system prefix found in value [{text}]. Make sure to "
                "prefix the number with '0x' for hexadecimal numbers or '0b' for binary numbers.")
        try:
            return parse_rust_uint(digits, radix, bits)
        except RustParseIntError as e:
            raise custom(f"Failed to parse string [{text}] as a number for CPU template - "
                         f"ParseIntError {{ kind: {e.kind} }}") from None
    return parse


def bitmap(bits: int) -> Any:
    def parse(text: str) -> str:
        width = 0
        for ch in reversed(text.removeprefix("0b")):
            if width == bits:
                raise custom(f"Failed to parse string [{text}] as a bitmap - string is too long")
            if ch == "_":
                continue
            if ch not in "01x":
                raise custom(f"Failed to parse string [{text}] as a bitmap - unknown "
                             f"character: {ord(ch.encode()[:1])}")
            width += 1
        return text
    return parse


def parse_register(text: str) -> str:
    if text not in ("eax", "ebx", "ecx", "edx"):
        raise custom("Invalid CPUID register. Must be one of [eax, ebx, ecx, edx]")
    return text


# ---- shared pieces --------------------------------------------------------------------

TOKEN_BUCKET = Struct("TokenBucketConfig", [
    field("size", U64),
    field("one_time_burst", Opt(U64)),
    field("refill_time", U64),
], deny_unknown=False)

RATE_LIMITER = Struct("RateLimiterConfig", [
    field("bandwidth", Opt(TOKEN_BUCKET)),
    field("ops", Opt(TOKEN_BUCKET)),
])

MAC = Validated(STRING, parse_mac)

STATIC_CPU_TEMPLATE = Enum("StaticCpuTemplate", ["C3", "T2", "T2S", "None", "T2CL", "T2A"])
HUGE_PAGES = Enum("HugePageConfig", ["None", "2M"])

# ---- request bodies -------------------------------------------------------------------

ACTION = Struct("ActionBody", [
    field("action_type", Enum("ActionType", ["FlushMetrics", "InstanceStart", "SendCtrlAltDel"])),
])

BOOT_SOURCE = Struct("BootSourceConfig", [
    field("kernel_image_path", STRING),
    field("initrd_path", Opt(STRING)),
    field("boot_args", Opt(STRING)),
])

MACHINE_CONFIG = Struct("MachineConfig", [
    field("vcpu_count", U8),
    field("mem_size_mib", USIZE),
    field("smt", Bool(), False),
    field("cpu_template", Opt(STATIC_CPU_TEMPLATE), None),
    field("track_dirty_pages", Bool(), False),
    field("huge_pages", HUGE_PAGES, "None"),
])

MACHINE_CONFIG_UPDATE = Struct("MachineConfigUpdate", [
    field("vcpu_count", Opt(U8), None),
    field("mem_size_mib", Opt(USIZE), None),
    field("smt", Opt(Bool()), None),
    field("cpu_template", Opt(STATIC_CPU_TEMPLATE), None),
    field("track_dirty_pages", Opt(Bool()), None),
    field("huge_pages", Opt(HUGE_PAGES), None),
])

DRIVE = Struct("BlockDeviceConfig", [
    field("drive_id", STRING),
    field("partuuid", Opt(STRING)),
    field("is_root_device", Bool()),
    field("cache_type", Enum("CacheType", ["Unsafe", "Writeback"]), "Unsafe"),
    field("is_read_only", Opt(Bool())),
    field("path_on_host", Opt(STRING)),
    field("rate_limiter", Opt(RATE_LIMITER)),
    field("io_engine", Opt(Enum("FileEngineType", ["Async", "Sync"]))),
    field("socket", Opt(STRING)),
])

DRIVE_UPDATE = Struct("BlockDeviceUpdateConfig", [
    field("drive_id", STRING),
    field("path_on_host", Opt(STRING)),
    field("rate_limiter", Opt(RATE_LIMITER)),
])

NETWORK_INTERFACE = Struct("NetworkInterfaceConfig", [
    field("iface_id", STRING),
    field("host_dev_name", STRING),
    field("guest_mac", Opt(MAC)),
    field("rx_rate_limiter", Opt(RATE_LIMITER)),
    field("tx_rate_limiter", Opt(RATE_LIMITER)),
])

NETWORK_INTERFACE_UPDATE = Struct("NetworkInterfaceUpdateConfig", [
    field("iface_id", STRING),
    field("rx_rate_limiter", Opt(RATE_LIMITER)),
    field("tx_rate_limiter", Opt(RATE_LIMITER)),
])

VSOCK = Struct("VsockDeviceConfig", [
    field("vsock_id", Opt(STRING), None),
    field("guest_cid", U32),
    field("uds_path", STRING),
])

ENTROPY = Struct("EntropyDeviceConfig", [field("rate_limiter", Opt(RATE_LIMITER))])

BALLOON = Struct("BalloonDeviceConfig", [
    field("amount_mib", U32),
    field("deflate_on_oom", Bool()),
    field("stats_polling_interval_s", U16, 0),
    field("free_page_hinting", Bool(), False),
    field("free_page_reporting", Bool(), False),
])

BALLOON_UPDATE = Struct("BalloonUpdateConfig", [field("amount_mib", U32)])
BALLOON_STATS_UPDATE = Struct("BalloonUpdateStatsConfig",
                              [field("stats_polling_interval_s", U16)])
BALLOON_HINTING_START = Struct("StartHintingCmd", [field("acknowledge_on_stop", Bool(), True)])

LOGGER = Struct("LoggerConfig", [
    field("log_path", Opt(PATH)),
    field("level", Opt(Validated(STRING, parse_level))),
    field("show_level", Opt(Bool())),
    field("show_log_origin", Opt(Bool())),
    field("module", Opt(STRING)),
])

METRICS = Struct("MetricsConfig", [field("metrics_path", PATH)], deny_unknown=False)

SERIAL = Struct("SerialConfig", [field("serial_out_path", Opt(PATH))])

MMDS_CONFIG = Struct("MmdsConfig", [
    field("version", Enum("MmdsVersion", ["V1", "V2"]), "V1"),
    field("network_interfaces", Seq(STRING)),
    field("ipv4_address", Opt(Str("IPv4 address", check=parse_ipv4))),
    field("imds_compat", Bool(), False),
])

MMDS_DATA: Schema = AnyValue()

SNAPSHOT_CREATE = Struct("CreateSnapshotParams", [
    field("snapshot_type", Enum("SnapshotType", ["Diff", "Full"]), "Full"),
    field("snapshot_path", PATH),
    field("mem_file_path", PATH),
])

MEM_BACKEND = Struct("MemBackendConfig", [
    field("backend_path", PATH),
    field("backend_type", Enum("MemBackendType", ["File", "Uffd"])),
])

NETWORK_OVERRIDE = Struct("NetworkOverride", [
    field("iface_id", STRING),
    field("host_dev_name", STRING),
], deny_unknown=False)

SNAPSHOT_LOAD = Struct("LoadSnapshotConfig", [
    field("snapshot_path", PATH),
    field("mem_file_path", Opt(PATH)),
    field("mem_backend", Opt(MEM_BACKEND)),
    field("enable_diff_snapshots", Bool(), False),
    field("track_dirty_pages", Bool(), False),
    field("resume_vm", Bool(), False),
    field("network_overrides", Seq(NETWORK_OVERRIDE), list),
])

VM_STATE = Struct("Vm", [field("state", Enum("VmState", ["Paused", "Resumed"]))])

PMEM = Struct("PmemConfig", [
    field("id", STRING),
    field("path_on_host", STRING),
    field("root_device", Bool(), False),
    field("read_only", Bool(), False),
])

MEMORY_HOTPLUG = Struct("MemoryHotplugConfig", [
    field("total_size_mib", USIZE),
    field("block_size_mib", USIZE, 2),
    field("slot_size_mib", USIZE, 128),
])

MEMORY_HOTPLUG_UPDATE = Struct("MemoryHotplugSizeUpdate", [field("requested_size_mib", USIZE)])

CPU_CONFIG = Struct("CustomCpuTemplate", [
    field("kvm_capabilities", Seq(Validated(STRING, parse_kvm_capability)), list),
    field("cpuid_modifiers", Seq(Struct("CpuidLeafModifier", [
        field("leaf", Validated(STRING, prefixed_number(32))),
        field("subleaf", Validated(STRING, prefixed_number(32))),
        field("flags", U32),
        field("modifiers", Seq(Struct("CpuidRegisterModifier", [
            field("register", Validated(STRING, parse_register)),
            field("bitmap", Validated(STRING, bitmap(32))),
        ], deny_unknown=False))),
    ], deny_unknown=False)), list),
    field("msr_modifiers", Seq(Struct("RegisterModifier", [
        field("addr", Validated(STRING, prefixed_number(32))),
        field("bitmap", Validated(STRING, bitmap(64))),
    ], deny_unknown=False)), list),
])

# The --config-file document (VmmConfig): kebab-case keys, unknown keys ignored.
VMM_CONFIG = Struct("VmmConfig", [
    field("balloon", Opt(BALLOON)),
    field("drives", Seq(DRIVE)),
    field("boot-source", BOOT_SOURCE),
    field("cpu-config", Opt(AnyValue())),
    field("logger", Opt(LOGGER)),
    field("machine-config", Opt(MACHINE_CONFIG)),
    field("metrics", Opt(METRICS)),
    field("mmds-config", Opt(MMDS_CONFIG)),
    field("network-interfaces", Seq(NETWORK_INTERFACE), list),
    field("vsock", Opt(VSOCK)),
    field("entropy", Opt(ENTROPY)),
    field("pmem", Seq(PMEM), list),
    field("memory-hotplug", Opt(MEMORY_HOTPLUG)),
], deny_unknown=False)

