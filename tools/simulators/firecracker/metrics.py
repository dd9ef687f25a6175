"""Firecracker's metrics: one JSON object per line, counters reset at every write.

The layout is v1.14.2's: the groups below in this order, with a `block_<drive_id>`
object per drive (sorted by id) before the `block` aggregate, and `net_<iface_id>`
objects before `net`. Counters hold deltas since the previous line; `*_agg`
objects keep their min/max and reset their sum, as Firecracker's do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

from tools.simulators.firecracker.logger import open_nonblocking

BLOCK_FIELDS = (
    "activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count "
    "flush_count queue_event_count rate_limiter_event_count update_count update_fails "
    "read_bytes write_bytes read_count write_count read_agg write_agg "
    "rate_limiter_throttled_events io_engine_throttled_events remaining_reqs_count")
NET_FIELDS = (
    "activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer "
    "event_fails rx_queue_event_count rx_event_rate_limiter_count rx_rate_limiter_throttled "
    "rx_tap_event_count rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails "
    "tap_write_fails tap_write_agg tx_bytes_count tx_malformed_frames tx_fails tx_count "
    "tx_packets_count tx_queue_event_count tx_rate_limiter_event_count "
    "tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count")

# (group, fields); "block" and "net" are preceded by their per-device groups.
GROUPS: tuple[tuple[str, str], ...] = (
    ("api_server", "process_startup_time_us process_startup_time_cpu_us"),
    ("balloon", "activate_fails inflate_count stats_updates_count stats_update_fails "
                "deflate_count event_fails free_page_report_count free_page_report_freed "
                "free_page_report_fails free_page_hint_count free_page_hint_freed "
                "free_page_hint_fails"),
    ("block", BLOCK_FIELDS),
    ("deprecated_api", "deprecated_http_api_calls"),
    ("get_api_requests", "instance_info_count machine_cfg_count mmds_count "
                         "vmm_version_count hotplug_memory_count"),
    ("i8042", "error_count missed_read_count missed_write_count read_count reset_count "
              "write_count"),
    ("uart", "error_count flush_count missed_read_count missed_write_count read_count "
             "write_count"),
    ("latencies_us", "full_create_snapshot diff_create_snapshot load_snapshot pause_vm "
                     "resume_vm vmm_full_create_snapshot vmm_diff_create_snapshot "
                     "vmm_load_snapshot vmm_pause_vm vmm_resume_vm"),
    ("logger", "missed_metrics_count metrics_fails missed_log_count"),
    ("mmds", "rx_accepted rx_accepted_err rx_accepted_unusual rx_bad_eth rx_invalid_token "
             "rx_no_token rx_count tx_bytes tx_count tx_errors tx_frames connections_created "
             "connections_destroyed"),
    ("net", NET_FIELDS),
    ("patch_api_requests", "drive_count drive_fails network_count network_fails "
                           "machine_cfg_count machine_cfg_fails mmds_count mmds_fails "
                           "hotplug_memory_count hotplug_memory_fails"),
    ("put_api_requests", "actions_count actions_fails boot_source_count boot_source_fails "
                         "drive_count drive_fails logger_count logger_fails machine_cfg_count "
                         "machine_cfg_fails cpu_cfg_count cpu_cfg_fails metrics_count "
                         "metrics_fails network_count network_fails mmds_count mmds_fails "
                         "vsock_count vsock_fails pmem_count pmem_fails serial_count "
                         "serial_fails hotplug_memory_count hotplug_memory_fails"),
    ("seccomp", "num_faults"),
    ("vcpu", "exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures "
             "kvmclock_ctrl_fails exit_io_in_agg exit_io_out_agg exit_mmio_read_agg "
             "exit_mmio_write_agg"),
    ("vmm", "panic_count"),
    ("signals", "sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill"),
    ("vsock", "activate_fails cfg_fails rx_queue_event_fails tx_queue_event_fails "
              "ev_queue_event_fails muxer_event_fails conn_event_fails rx_queue_event_count "
              "tx_queue_event_count rx_bytes_count tx_bytes_count rx_packets_count "
              "tx_packets_count conns_added conns_killed conns_removed killq_resync "
              "tx_flush_fails tx_write_fails rx_read_fails"),
    ("entropy", "activate_fails entropy_event_fails entropy_event_count entropy_bytes "
                "host_rng_fails entropy_rate_limiter_throttled rate_limiter_event_count"),
    ("pmem", "activate_fails cfg_fails event_fails queue_event_count"),
    ("interrupts", "triggers config_updates"),
    ("memory_hotplug", "activate_fails queue_event_fails queue_event_count plug_agg "
                       "plug_count plug_bytes plug_fails unplug_agg unplug_count unplug_bytes "
                       "unplug_fails unplug_discard_fails unplug_all_agg unplug_all_count "
                       "unplug_all_fails state_agg state_count state_fails"),
)
PER_DEVICE = {"block", "net"}

Group = dict[str, int | dict[str, int]]


def _fresh_group(fields: str) -> Group:
    return {name: ({"min_us": 0, "max_us": 0, "sum_us": 0} if name.endswith("_agg") else 0)
            for name in fields.split()}


class MetricsAlreadyInitialized(Exception):
    pass


class Metrics:
    def __init__(self) -> None:
        self.fd: int | None = None
        self.groups: dict[str, Group] = {name: _fresh_group(f) for name, f in GROUPS}
        self.devices: dict[str, dict[str, Group]] = {"block": {}, "net": {}}

    @property
    def initialized(self) -> bool:
        return self.fd is not None

    def init(self, path: str) -> None:
        """METRICS.init: OSError for the file, MetricsAlreadyInitialized the second time."""
        fd = open_nonblocking(path)
        if self.fd is not None:
            os.close(fd)
            raise MetricsAlreadyInitialized("Reinitialization of metrics not allowed.")
        self.fd = fd

    def inc(self, group: str, name: str, by: int = 1) -> None:
        value = self.groups[group][name]
        assert isinstance(value, int)
        self.groups[group][name] = value + by

    def set(self, group: str, name: str, value: int) -> None:
        self.groups[group][name] = value

    def device(self, kind: str, device_id: str) -> Group:
        """The per-device group of a drive ("block") or network interface ("net")."""
        fields = BLOCK_FIELDS if kind == "block" else NET_FIELDS
        return self.devices[kind].setdefault(device_id, _fresh_group(fields))

    def inc_device(self, kind: str, device_id: str, name: str, by: int = 1) -> None:
        group = self.device(kind, device_id)
        value = group[name]
        assert isinstance(value, int)
        group[name] = value + by

    def write(self, missed_log_count: int = 0) -> bool:
        """Write one line; False when metrics are not configured (not an error)."""
        if self.fd is None:
            return False
        self.groups["logger"]["missed_log_count"] = missed_log_count
        line: dict[str, object] = {"utc_timestamp_ms": time.time_ns() // 1_000_000}
        for name, _ in GROUPS:
            if name in PER_DEVICE:
                devices = self.devices[name]
                for device_id in sorted(devices):
                    line[f"{name}_{device_id}"] = devices[device_id]
                line[name] = _aggregate(self.groups[name], devices.values())
            else:
                line[name] = self.groups[name]
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self.fd, data)
        except OSError:
            self.inc("logger", "metrics_fails")
            return True
        self._reset()
        return True

    def _reset(self) -> None:
        for group in [*self.groups.values(), *(g for d in self.devices.values()
                                               for g in d.values())]:
            for name, value in group.items():
                if isinstance(value, dict):
                    value["sum_us"] = 0
                else:
                    group[name] = 0


def _aggregate(base: Group, devices: Iterable[Group]) -> Group:
    """The `block`/`net` object: per-device counters summed over all devices."""
    total: Group = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for device in devices:
        for name, value in device.items():
            current = total[name]
            if isinstance(value, dict) and isinstance(current, dict):
                current["sum_us"] += value["sum_us"]
                current["max_us"] = max(current["max_us"], value["max_us"])
                if value["min_us"]:
                    current["min_us"] = (min(current["min_us"], value["min_us"])
                                         if current["min_us"] else value["min_us"])
            elif isinstance(value, int) and isinstance(current, int):
                total[name] = current + value
    return total
