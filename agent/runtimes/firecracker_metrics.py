"""Firecracker's metrics file, totalled: its counters hold the change since the previous
flush, so the runtime keeps running sums per VM, read incrementally."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)


# Firecracker metrics counter -> VmMetrics field, for the device-kind aggregates.
_BLOCK_COUNTERS = {"read_bytes": "bytes_read", "write_bytes": "bytes_written",
                   "read_count": "read_operations", "write_count": "write_operations"}
_NET_COUNTERS = {"rx_bytes_count": "bytes_received", "tx_bytes_count": "bytes_transmitted",
                 "rx_packets_count": "packets_received", "tx_packets_count": "packets_transmitted"}


@dataclass
class MetricsTotals:
    """Running totals of one Firecracker metrics file.

    Firecracker appends one JSON object per flush, and its counters hold the change
    since the previous flush, so a total is the sum over every line. Each update
    reads only what was appended since the last one.
    """

    path: Path
    offset: int = 0
    block: dict[str, int] = field(default_factory=dict)
    net: dict[str, int] = field(default_factory=dict)

    def update(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # rewritten by a new process
                    self.offset, self.block, self.net = 0, {}, {}
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        # A line still being written is picked up by the next update.
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                sample = json.loads(line)
            except ValueError:
                continue
            if isinstance(sample, dict):
                _add_counters(self.block, sample.get("block"), _BLOCK_COUNTERS)
                _add_counters(self.net, sample.get("net"), _NET_COUNTERS)

    def storage_stats(self) -> vm_pb2.StorageStats:
        return vm_pb2.StorageStats(**self.block)

    def network_stats(self) -> vm_pb2.NetworkStats:
        return vm_pb2.NetworkStats(**self.net)


def _add_counters(totals: dict[str, int], group: object, names: dict[str, str]) -> None:
    if not isinstance(group, dict):
        return
    for counter, field_name in names.items():
        value = group.get(counter)
        if isinstance(value, int):
            totals[field_name] = totals.get(field_name, 0) + value


@dataclass
class VmSamples:
    """Per-VM state for rates: the previous CPU reading and the metrics totals."""

    pid: int
    metrics: MetricsTotals
    cpu_at: float  # wall clock of the previous CPU reading
    cpu_seconds: float
