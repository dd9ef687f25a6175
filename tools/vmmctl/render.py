"""How vmmctl shows API messages: rich tables for people, JSON for scripts.

Every function here takes protobuf messages and returns text or a rich
renderable; nothing here talks to the network or decides exit codes.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from vmm.v1 import host_pb2, vm_pb2

# Tables written to a pipe or file keep one row per line up to this width.
PIPE_WIDTH = 200

# Newer protobuf releases can print int64 fields as JSON numbers, as the spec's
# example configs write them; older ones always quote them.
_INT64_AS_NUMBERS = "unquote_int64_if_possible" in inspect.signature(
    json_format.MessageToDict
).parameters

_STATE_STYLES: dict[int, str] = {
    vm_pb2.VM_STATE_CREATED: "cyan",
    vm_pb2.VM_STATE_RUNNING: "green",
    vm_pb2.VM_STATE_PAUSED: "yellow",
    vm_pb2.VM_STATE_SHUTDOWN: "dim",
    vm_pb2.VM_STATE_FAILED: "bold red",
    vm_pb2.VM_STATE_UNKNOWN: "magenta",
}

_HEALTH_STYLES: dict[int, str] = {
    host_pb2.HOST_HEALTH_READY: "green",
    host_pb2.HOST_HEALTH_DEGRADED: "yellow",
    host_pb2.HOST_HEALTH_DOWN: "bold red",
}

# The support matrix's own marks.
SUPPORT_MARKS: dict[int, str] = {
    host_pb2.SUPPORT_FULL: "✅",
    host_pb2.SUPPORT_PARTIAL: "⚠️",
    host_pb2.SUPPORT_IGNORED: "ignored",
    host_pb2.SUPPORT_NONE: "❌",
}

_BINARY_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def stdout_console() -> Console:
    """A console on the current stdout, wide enough not to fold piped tables."""
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(highlight=False, width=width)


def stderr_console() -> Console:
    # Messages are not folded: they end up in logs and get grepped.
    return Console(stderr=True, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- JSON


def message_dict(message: Message) -> dict[str, Any]:
    """The message in protobuf's JSON mapping, with the .proto's snake_case names.

    Fields at their default value are included so a script can read `state`
    or `success` without guessing whether absence means zero.
    """
    options: dict[str, Any] = {
        "preserving_proto_field_name": True,
        "always_print_fields_with_no_presence": True,
    }
    if _INT64_AS_NUMBERS:
        options["unquote_int64_if_possible"] = True
    return json_format.MessageToDict(message, **options)


def to_json(value: Message | dict[str, Any], *, one_line: bool = False) -> str:
    data = message_dict(value) if isinstance(value, Message) else value
    if one_line:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(data, ensure_ascii=False, indent=2)


# ---------------------------------------------------------------- small values


def format_bytes(size: int) -> str:
    """512 MiB as "512MiB"; sizes that are not whole units keep up to one decimal."""
    if size <= 0:
        return "0" if size == 0 else str(size)
    for unit, factor in _BINARY_UNITS:
        if size >= factor:
            value = Decimal(size) / factor
            if value == value.to_integral_value():
                return f"{int(value)}{unit}"
            return f"{value:.1f}{unit}"
    return f"{size}B"


def format_age(timestamp: int, now: float | None = None) -> str:
    """How long ago a Unix timestamp was, kubectl style: 45s, 12m, 3h, 5d."""
    if timestamp <= 0:
        return "-"
    elapsed = int((time.time() if now is None else now) - timestamp)
    if elapsed < 0:
        return "0s"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if elapsed >= 2 * seconds:
            return f"{elapsed // seconds}{unit}"
    return f"{elapsed}s"


def format_time(timestamp: int) -> str:
    if timestamp <= 0:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short_enum_name(enum: Any, value: int, prefix: str) -> str:
    """An enum value without its prefix (VM_STATE_RUNNING as RUNNING); unknown values as numbers."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:  # a value newer than this client
        return str(value)


def format_time_and_age(timestamp: int, now: float | None = None) -> str:
    """ "2025-01-02 03:04:05 UTC (5m ago)", or "-" for a time never set."""
    if timestamp <= 0:
        return "-"
    return f"{format_time(timestamp)} ({format_age(timestamp, now)} ago)"


def state_name(state: int) -> str:
    return _short_enum_name(vm_pb2.VmState, state, "VM_STATE_")


def state_text(state: int) -> Text:
    return Text(state_name(state), style=_STATE_STYLES.get(state, ""))


def health_text(health: int) -> Text:
    name = _short_enum_name(host_pb2.HostHealth, health, "HOST_HEALTH_")
    return Text(name, style=_HEALTH_STYLES.get(health, ""))


def placement_text(placement: vm_pb2.Placement) -> str:
    """Where a VM runs, e.g. "firecracker on host-a (simulated)"; "-" before placement."""
    if not placement.host_id and not placement.backend:
        return "-"
    text = f"{placement.backend or '?'} on {placement.host_id or '?'}"
    return f"{text} (simulated)" if placement.simulated else text


def support_cell(feature: host_pb2.Feature) -> str:
    mark = SUPPORT_MARKS.get(feature.support, "?")
    if not feature.detail:
        return mark
    if feature.detail.lower().startswith(mark.lower()):  # "ignored - no hotplug support"
        return feature.detail
    return f"{mark} {feature.detail}"


def _key_values(rows: Iterable[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _plain(value: str) -> Text:
    # Text, not a markup string: server-supplied text like "storage[0]" is not markup.
    return Text(value)


# ---------------------------------------------------------------- VMs


def vm_table(vms: Iterable[vm_pb2.VmInfo], now: float | None = None) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "STATE", "BACKEND", "HOST", "VCPUS", "MEMORY", "AGE"):
        table.add_column(column, no_wrap=True, justify="right" if column in (
            "VCPUS", "MEMORY") else "left")
    for vm in vms:
        backend = vm.placement.backend or "-"
        if vm.placement.simulated:
            backend += " (simulated)"
        table.add_row(
            _plain(vm.vm_id),
            state_text(vm.state),
            _plain(backend),
            _plain(vm.placement.host_id or "-"),
            str(vm.vcpu_count),
            format_bytes(vm.memory_size_bytes),
            format_age(vm.created_timestamp, now),
        )
    return table


def vm_detail(info: vm_pb2.GetVmInfoResponse, now: float | None = None) -> RenderableType:
    config = info.config
    state = state_text(info.state)
    if info.desired_state and info.desired_state != info.state:
        state.append(f" (desired {state_name(info.desired_state)})", style="dim")
    rows: list[tuple[str, RenderableType]] = [
        ("ID", _plain(info.vm_id)),
        ("Namespace", _plain(info.namespace or "default")),
        ("State", state),
        ("Reason", _plain(info.state_reason or "-")),
        ("Placement", _plain(placement_text(info.placement))),
        ("Generation", f"{info.generation} (observed {info.observed_generation})"),
        ("Created", format_time_and_age(info.created_timestamp, now)),
        ("Modified", format_time(info.modified_timestamp)),
        ("vCPUs", _vcpu_text(config.cpu)),
        ("Memory", _memory_text(config.memory)),
        ("Kernel", _plain(config.boot.kernel_path or "-")),
    ]
    if config.boot.initrd_path:
        rows.append(("Initrd", _plain(config.boot.initrd_path)))
    if config.boot.kernel_args:
        rows.append(("Kernel args", _plain(config.boot.kernel_args)))
    if config.restart_policy.mode == vm_pb2.RESTART_MODE_ON_FAILURE:
        rows.append(("Restarts", _plain(restart_text(config.restart_policy, info.restart))))
    parts: list[RenderableType] = [_key_values(rows)]
    if config.storage:
        parts += [Text("\nDisks", style="bold"), _disk_table(config.storage)]
    if config.network:
        parts += [Text("\nNetwork interfaces", style="bold"),
                  _nic_table(config.network, info.network_interfaces)]
    if config.metadata:
        parts += [Text("\nMetadata", style="bold"), _string_map(config.metadata)]
    if info.HasField("metrics"):
        parts += [Text("\nMetrics", style="bold"), _vm_metrics(info.metrics)]
    if info.backend_info:
        parts += [Text("\nBackend info", style="bold"), _string_map(info.backend_info)]
    return Group(*parts)


def restart_text(policy: vm_pb2.RestartPolicy, restart: vm_pb2.RestartStatus) -> str:
    """e.g. "1 of 3 within 600s, next at 12:00:01 (backoff 2s)"."""
    limit = f" of {policy.attempts}" if policy.attempts else ""
    window = f" within {policy.interval_seconds}s" if policy.interval_seconds else ""
    text = f"{restart.attempts}{limit}{window} (on failure)"
    if restart.next_restart_timestamp:
        text += (f", next at {format_time(restart.next_restart_timestamp)} "
                 f"(backoff {restart.backoff_seconds:g}s)")
    elif restart.exhausted:
        text += ", used up: the VM stays FAILED"
    return text


def _vcpu_text(cpu: vm_pb2.CpuConfig) -> str:
    text = str(cpu.vcpu_count)
    if cpu.max_vcpu_count:
        text += f" (max {cpu.max_vcpu_count})"
    return text


def _memory_text(memory: vm_pb2.MemoryConfig) -> str:
    text = format_bytes(memory.size_bytes)
    if memory.max_size_bytes:
        text += f" (max {format_bytes(memory.max_size_bytes)})"
    if memory.hotplug_enabled:
        text += ", hotplug"
    return text


def _disk_table(disks: Iterable[vm_pb2.StorageDevice]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "PATH", "MODE", "ROOT", "INTERFACE"):
        table.add_column(column)
    for disk in disks:
        table.add_row(_plain(disk.id or "-"), _plain(disk.path), "ro" if disk.read_only else "rw",
                      "yes" if disk.is_root_device else "", _plain(disk.interface_type or "-"))
    return table


def _nic_table(nics: Iterable[vm_pb2.NetworkInterface],
               running: Iterable[vm_pb2.NetworkInterfaceStatus] = ()) -> Table:
    """Each NIC as configured, with what its host reports of it (the TAP the agent made,
    the MAC it derived) where it has."""
    on_host = {nic.id: nic for nic in running}
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NETWORK", "ADDRESS", "TAP", "MAC", "INTERFACE"):
        table.add_column(column)
    for i, nic in enumerate(nics):
        seen = on_host.get(nic.id or f"eth{i}")
        network = nic.network or (seen.network if seen else "") or nic.bridge
        tap = (seen.tap_device if seen else "") or nic.tap_device
        mac = nic.mac_address or (seen.mac_address if seen else "")
        table.add_row(_plain(nic.id or "-"), _plain(network or "-"),
                      _plain(nic.ip_address or "-"), _plain(tap or "-"), _plain(mac or "-"),
                      _plain(nic.interface_type or "-"))
    return table


def _string_map(values: Any) -> Table:
    return _key_values((key, _plain(values[key])) for key in sorted(values))


def _vm_metrics(metrics: vm_pb2.VmMetrics) -> Table:
    net, disk = metrics.network_stats, metrics.storage_stats
    return _key_values([
        ("CPU", f"{metrics.cpu_usage_percent:.1f}%"),
        ("Memory used", format_bytes(metrics.memory_usage_bytes)),
        ("Uptime", f"{metrics.uptime_seconds}s"),
        ("Network rx/tx", f"{format_bytes(net.bytes_received)} / "
                          f"{format_bytes(net.bytes_transmitted)} "
                          f"({net.packets_received} / {net.packets_transmitted} packets)"),
        ("Disk read/written", f"{format_bytes(disk.bytes_read)} / "
                              f"{format_bytes(disk.bytes_written)} "
                              f"({disk.read_operations} / {disk.write_operations} ops)"),
    ])


def watch_line(event: vm_pb2.WatchVmsResponse) -> str:
    """One event as one line: type, VM, state, placement, revision, reason."""
    kind = _short_enum_name(vm_pb2.VmEventType, event.type, "VM_EVENT_TYPE_")
    vm = event.vm
    line = (f"{kind:<8} {vm.vm_id} {state_name(vm.state)} {placement_text(vm.placement)} "
            f"rev={event.revision}")
    return f"{line} {vm.state_reason}" if vm.state_reason else line


# ---------------------------------------------------------------- hosts and backends


def _backend_names(host: host_pb2.Host) -> str:
    names = [f"{b.name} (simulated)" if b.simulated else b.name for b in host.backends]
    return ", ".join(names) or "-"


def host_table(hosts: Iterable[host_pb2.Host], now: float | None = None) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("HOST", "HEALTH", "BACKENDS", "VCPUS", "MEMORY", "VMS", "HEARTBEAT"):
        table.add_column(column, no_wrap=column != "BACKENDS")
    for host in hosts:
        heartbeat = format_age(host.last_heartbeat_timestamp, now)
        table.add_row(
            _plain(host.host_id),
            health_text(host.health),
            _plain(_backend_names(host)),
            f"{host.allocated.vcpus}/{host.allocatable.vcpus}",
            f"{format_bytes(host.allocated.memory_bytes)}/"
            f"{format_bytes(host.allocatable.memory_bytes)}",
            str(host.vm_count),
            heartbeat if heartbeat == "-" else f"{heartbeat} ago",
        )
    return table


def host_detail(host: host_pb2.Host, now: float | None = None) -> RenderableType:
    health = health_text(host.health)
    if host.health_detail:
        health.append(f" ({host.health_detail})")
    rows: list[tuple[str, RenderableType]] = [
        ("Host", _plain(host.host_id)),
        ("Hostname", _plain(host.hostname or "-")),
        ("Health", health),
        ("Agent version", _plain(host.agent_version or "-")),
        ("Registered", format_time(host.registered_timestamp)),
        ("Last heartbeat", format_time_and_age(host.last_heartbeat_timestamp, now)),
        ("VMs", str(host.vm_count)),
        ("vCPUs", f"{host.allocated.vcpus} allocated / {host.allocatable.vcpus} allocatable "
                  f"/ {host.capacity.vcpus} capacity (overcommit "
                  f"{host.cpu_overcommit_ratio:g}x)"),
        ("Memory", f"{format_bytes(host.allocated.memory_bytes)} allocated / "
                   f"{format_bytes(host.allocatable.memory_bytes)} allocatable / "
                   f"{format_bytes(host.capacity.memory_bytes)} capacity (overcommit "
                   f"{host.memory_overcommit_ratio:g}x)"),
    ]
    if host.HasField("metrics"):
        m = host.metrics
        rows.append(("Usage", f"CPU {m.cpu_usage_percent:.1f}%, load {m.load_average_1m:.2f}, "
                              f"memory {format_bytes(m.memory_used_bytes)} used / "
                              f"{format_bytes(m.memory_available_bytes)} available, agent RSS "
                              f"{format_bytes(m.agent_rss_bytes)}"))
    parts: list[RenderableType] = [_key_values(rows)]
    if host.labels:
        parts += [Text("\nLabels", style="bold"), _string_map(host.labels)]
    for backend in host.backends:
        parts.append(Text(f"\nBackend {backend.name}", style="bold"))
        parts.append(_key_values([
            ("Version", _plain(backend.version or "-")),
            ("Binary", _plain(backend.binary_path or "-")),
            ("Simulated", "yes" if backend.simulated else "no"),
            *_limit_rows(backend.capabilities.limits),
        ]))
        parts.append(_feature_table(backend.capabilities.features))
    return Group(*parts)


def _range(low: str, high: str, unbounded: bool) -> str:
    return f"{low} and up" if unbounded else f"{low}-{high}"


def _limit_rows(limits: host_pb2.BackendLimits) -> list[tuple[str, RenderableType]]:
    # A zero maximum is a backend declaring no upper bound.
    return [
        ("vCPU limit", _range(str(limits.min_vcpus), str(limits.max_vcpus),
                              limits.max_vcpus == 0)),
        ("Memory limit", _range(format_bytes(limits.min_memory_bytes),
                                format_bytes(limits.max_memory_bytes),
                                limits.max_memory_bytes == 0)),
        ("Max disks", str(limits.max_disks) if limits.max_disks else "no limit"),
        ("Max NICs", str(limits.max_nics) if limits.max_nics else "no limit"),
    ]


def _feature_table(features: Iterable[host_pb2.Feature]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("CATEGORY", "FEATURE", "SUPPORT", "DETAIL"):
        table.add_column(column)
    for f in features:
        table.add_row(_plain(f.category), _plain(f.title or f.name),
                      SUPPORT_MARKS.get(f.support, "?"), _plain(f.detail))
    return table


def capability_matrix(backends: Iterable[host_pb2.BackendCapabilities]) -> Table:
    """The support matrix as the spec draws it: one row per feature, one column per backend.

    Rows come from the server's declarations (in their order, grouped by
    category), so a feature this client has never heard of still shows.
    """
    backends = list(backends)
    by_backend = [{f.name: f for f in b.features} for b in backends]
    rows: dict[str, host_pb2.Feature] = {}
    for b in backends:
        for f in b.features:
            rows.setdefault(f.name, f)
    categories: dict[str, list[host_pb2.Feature]] = {}
    for f in rows.values():
        categories.setdefault(f.category or "Other", []).append(f)

    table = Table(header_style="bold", show_lines=False)
    table.add_column("FEATURE", style="bold")
    for b in backends:
        table.add_column(b.backend)
    for label, cells in _limit_matrix_rows(backends):
        table.add_row(label, *cells)
    for category, features in categories.items():
        table.add_section()
        table.add_row(Text(category, style="italic"), *[""] * len(backends))
        for f in features:
            cells = [support_cell(declared[f.name]) if f.name in declared else "-"
                     for declared in by_backend]
            table.add_row(_plain(f.title or f.name), *[_plain(c) for c in cells])
    return table


def _limit_matrix_rows(
    backends: list[host_pb2.BackendCapabilities],
) -> list[tuple[str, list[str]]]:
    per_backend = [dict((k, str(v)) for k, v in _limit_rows(b.limits)) for b in backends]
    labels = [label for label, _ in _limit_rows(host_pb2.BackendLimits())]
    return [(label, [limits[label] for limits in per_backend]) for label in labels]
