"""A QEMU VM's metrics: vCPU thread time as a usage rate, memory, block and TAP counters."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent import process
from agent.hypervisors.qmp import QmpClient
from agent.process import ProcessRef
from agent.runtimes.qemu import record
from agent.vm_dir import VmDir
from vmm.v1 import vm_pb2


@dataclass
class _CpuSample:
    pid: int
    at: float
    vcpu_seconds: float


class QemuMetrics:
    """Reads VMs' metrics, remembering each one's last vCPU time to report usage since then."""

    def __init__(self) -> None:
        self._cpu_samples: dict[Path, _CpuSample] = {}

    def forget(self, vm: VmDir) -> None:
        self._cpu_samples.pop(vm.path, None)

    async def read(self, vm: VmDir) -> vm_pb2.VmMetrics:
        data = vm.load_runtime()
        ref = ProcessRef.from_dict(data)
        if ref is None or not process.is_alive(ref):
            return vm_pb2.VmMetrics()
        async with QmpClient(vm.api_socket) as qmp:
            blockstats = await qmp.execute("query-blockstats") or []
            vcpu_threads = [c["thread-id"] for c in await qmp.execute("query-cpus-fast") or []]
        now, vcpu_seconds = time.time(), _threads_cpu_seconds(ref.pid, vcpu_threads)
        sample = self._cpu_samples.get(vm.path)
        if sample is None or sample.pid != ref.pid:
            # No earlier reading of this process: average since it started.
            sample = _CpuSample(ref.pid, ref.started_at, 0.0)
        elapsed = now - sample.at
        cpu_percent = (max(0.0, (vcpu_seconds - sample.vcpu_seconds) / elapsed * 100)
                       if elapsed > 0 else 0.0)
        self._cpu_samples[vm.path] = _CpuSample(ref.pid, now, vcpu_seconds)
        booted_at = data.get(record.BOOTED_AT)
        return vm_pb2.VmMetrics(
            cpu_usage_percent=cpu_percent,
            memory_usage_bytes=process.rss_bytes(ref),
            storage_stats=_storage_stats(blockstats),
            network_stats=_tap_stats(record.running_config(vm)),
            uptime_seconds=int(now - booted_at) if isinstance(booted_at, int | float) else 0,
        )


def _threads_cpu_seconds(pid: int, thread_ids: Sequence[int]) -> float:
    """CPU time (user + system) of the given threads of pid."""
    wanted = set(thread_ids)
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return 0.0
    return float(sum(t.user_time + t.system_time for t in threads if t.id in wanted))


def _storage_stats(blockstats: Sequence[Mapping[str, Any]]) -> vm_pb2.StorageStats:
    total = vm_pb2.StorageStats()
    for device in blockstats:
        stats = device.get("stats", {})
        total.bytes_read += int(stats.get("rd_bytes", 0))
        total.bytes_written += int(stats.get("wr_bytes", 0))
        total.read_operations += int(stats.get("rd_operations", 0))
        total.write_operations += int(stats.get("wr_operations", 0))
    return total


def _tap_stats(config: vm_pb2.VmConfig) -> vm_pb2.NetworkStats:
    """Guest traffic as seen on the host's TAP devices (the guest receives what they send)."""
    total = vm_pb2.NetworkStats()
    for nic in config.network:
        if not nic.tap_device:
            continue
        stats = Path("/sys/class/net") / nic.tap_device / "statistics"
        total.bytes_received += _read_counter(stats / "tx_bytes")
        total.bytes_transmitted += _read_counter(stats / "rx_bytes")
        total.packets_received += _read_counter(stats / "tx_packets")
        total.packets_transmitted += _read_counter(stats / "rx_packets")
    return total


def _read_counter(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0
