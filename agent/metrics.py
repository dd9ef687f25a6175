"""Per-VM metrics, sampled on their own interval, and the agent's Prometheus endpoint.

The sampler asks every running VM's runtime for its metrics once per `metrics_interval`,
the VMs spread evenly over the interval and at most `concurrency` of them at a time. A VM
whose sample is still under way (a hypervisor that does not answer) is skipped, not queued
again, and a sample that takes longer than an interval is abandoned. Heartbeats never wait
for it: they carry whatever samples are new since the previous beat (`take_fresh`).

`AgentTelemetry` exposes the latest samples, heartbeat lag and VMs by state in the
Prometheus text format, served over HTTP by `serve_metrics` on the agent's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agent.reconciler import Reconciler
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)


@dataclass
class Sample:
    vm_id: str
    backend: str
    metrics: vm_pb2.VmMetrics
    sampled_at: float  # wall clock


class MetricsSampler:
    """The latest metrics of every running VM, refreshed every `interval` seconds."""

    def __init__(self, reconciler: Reconciler, interval: float = 10.0,
                 concurrency: int = 32, timeout: float | None = None) -> None:
        self.reconciler = reconciler
        self.interval = interval
        self.concurrency = max(1, concurrency)
        # How long one sample may take before it is abandoned.
        self.timeout = timeout if timeout is not None else max(1.0, interval)
        self.latest: dict[str, Sample] = {}
        self._fresh: set[str] = set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self.samples = 0
        self.failures = 0
        self.skipped_busy = 0

    def start(self) -> None:
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._task = asyncio.create_task(self._run(), name="metrics-sampler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def take_fresh(self) -> list[agent_pb2.VmStatus]:
        """The samples taken since the previous call, as heartbeat entries."""
        out = [agent_pb2.VmStatus(vm_id=vm_id, metrics=self.latest[vm_id].metrics)
               for vm_id in sorted(self._fresh) if vm_id in self.latest]
        self._fresh.clear()
        return out

    async def _run(self) -> None:
        # Each round spreads its VMs evenly over the interval, so every VM is sampled
        # once per interval at a steady phase and heartbeats carry an even share.
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            targets = self._targets()
            step = self.interval / max(1, len(targets))
            for i, (vm_id, backend) in enumerate(targets):
                self._start(vm_id, backend)
                await asyncio.sleep(max(0.0, started + (i + 1) * step - loop.time()))
            if not targets:
                await asyncio.sleep(self.interval)

    def _targets(self) -> list[tuple[str, str]]:
        """The VMs to sample this round; forgets the samples of VMs that stopped running."""
        self.rounds += 1
        targets = self.reconciler.metrics_targets()
        wanted = {vm_id for vm_id, _ in targets}
        for vm_id in list(self.latest):
            if vm_id not in wanted:
                del self.latest[vm_id]
                self._fresh.discard(vm_id)
        return targets

    def _start(self, vm_id: str, backend: str) -> None:
        assert self._semaphore is not None, "start() the sampler first"
        if vm_id in self._inflight:
            self.skipped_busy += 1
            return
        task = asyncio.create_task(self._sample(vm_id, backend, self._semaphore))
        self._inflight[vm_id] = task
        task.add_done_callback(partial(self._done, vm_id))

    def _done(self, vm_id: str, _task: object) -> None:
        self._inflight.pop(vm_id, None)

    async def _sample(self, vm_id: str, backend: str, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            try:
                async with asyncio.timeout(self.timeout):
                    metrics = await self.reconciler.sample_metrics(vm_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                log.debug("sampling vm %s failed: %s", vm_id, exc or type(exc).__name__,
                          extra={"vm_id": vm_id})
                return
        if metrics is None:
            return
        self.samples += 1
        self.latest[vm_id] = Sample(vm_id, backend, metrics, time.time())
        self._fresh.add(vm_id)


# ---- Prometheus -------------------------------------------------------------------------

# Every series also carries `host`, the agent's host_id.
_VM_LABELS = ["vm_id", "backend", "host"]
# (metric name, help, VmMetrics getter)
_VM_GAUGES = (
    ("vmm_agent_vm_cpu_usage_percent", "Hypervisor CPU use since the previous sample, "
     "percent of one CPU.", lambda m: m.cpu_usage_percent),
    ("vmm_agent_vm_memory_usage_bytes", "Resident memory of the hypervisor process.",
     lambda m: m.memory_usage_bytes),
    ("vmm_agent_vm_uptime_seconds", "Seconds since the guest booted.",
     lambda m: m.uptime_seconds),
)
_VM_COUNTERS = (
    ("vmm_agent_vm_disk_read_bytes", "Bytes the guest read from its disks.",
     lambda m: m.storage_stats.bytes_read),
    ("vmm_agent_vm_disk_written_bytes", "Bytes the guest wrote to its disks.",
     lambda m: m.storage_stats.bytes_written),
    ("vmm_agent_vm_disk_read_operations", "Read operations on the guest's disks.",
     lambda m: m.storage_stats.read_operations),
    ("vmm_agent_vm_disk_write_operations", "Write operations on the guest's disks.",
     lambda m: m.storage_stats.write_operations),
    ("vmm_agent_vm_network_receive_bytes", "Bytes the guest received.",
     lambda m: m.network_stats.bytes_received),
    ("vmm_agent_vm_network_transmit_bytes", "Bytes the guest transmitted.",
     lambda m: m.network_stats.bytes_transmitted),
    ("vmm_agent_vm_network_receive_packets", "Packets the guest received.",
     lambda m: m.network_stats.packets_received),
    ("vmm_agent_vm_network_transmit_packets", "Packets the guest transmitted.",
     lambda m: m.network_stats.packets_transmitted),
)


class _StateCollector(Collector):
    """Reads the sampler and the reconciler at scrape time."""

    def __init__(self, reconciler: Reconciler, sampler: MetricsSampler | None,
                 host: str) -> None:
        self.reconciler = reconciler
        self.sampler = sampler
        self.host = host

    def collect(self) -> Iterable[Metric]:
        by_state = GaugeMetricFamily("vmm_agent_vms", "VMs on this host by state.",
                                     labels=["state", "host"])
        counts: dict[str, int] = {name: 0 for name in vm_pb2.VmState.keys()}
        for status in list(self.reconciler.status.values()):
            counts[vm_pb2.VmState.Name(status.state)] += 1
        for state, count in counts.items():
            by_state.add_metric([state.removeprefix("VM_STATE_").lower(), self.host], count)
        yield by_state
        if self.sampler is None:
            return
        yield from self._vm_metrics(list(self.sampler.latest.values()))
        yield from self._sampler_counters(self.sampler)

    def _vm_metrics(self, samples: list[Sample]) -> Iterator[Metric]:
        for name, text, get in _VM_GAUGES:
            gauge = GaugeMetricFamily(name, text, labels=_VM_LABELS)
            for s in samples:
                gauge.add_metric([s.vm_id, s.backend, self.host], float(get(s.metrics)))
            yield gauge
        for name, text, get in _VM_COUNTERS:
            counter = CounterMetricFamily(name, text, labels=_VM_LABELS)
            for s in samples:
                counter.add_metric([s.vm_id, s.backend, self.host], float(get(s.metrics)))
            yield counter
        age = GaugeMetricFamily("vmm_agent_vm_sample_timestamp_seconds",
                                "When the VM's metrics were sampled (seconds since the epoch).",
                                labels=_VM_LABELS)
        for s in samples:
            age.add_metric([s.vm_id, s.backend, self.host], s.sampled_at)
        yield age

    def _sampler_counters(self, sampler: MetricsSampler) -> Iterator[Metric]:
        for family, name, text, value in (
                (CounterMetricFamily, "vmm_agent_metrics_samples", "VM metrics samples taken.",
                 sampler.samples),
                (CounterMetricFamily, "vmm_agent_metrics_sample_failures",
                 "VM metrics samples that failed or timed out.", sampler.failures),
                (CounterMetricFamily, "vmm_agent_metrics_samples_skipped",
                 "VMs skipped in a round because their previous sample was still under way.",
                 sampler.skipped_busy),
                (GaugeMetricFamily, "vmm_agent_metrics_samples_in_flight",
                 "VM metrics samples under way.", sampler.inflight),
                (GaugeMetricFamily, "vmm_agent_metrics_interval_seconds",
                 "Seconds between metrics samples of each VM.", sampler.interval)):
            metric = family(name, text, labels=["host"])
            metric.add_metric([self.host], float(value))
            yield metric


class AgentTelemetry:
    """The agent's Prometheus registry: VM metrics, VM states, heartbeat timing."""

    def __init__(self, reconciler: Reconciler, sampler: MetricsSampler | None,
                 host: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(reconciler, sampler, host))
        labels = ["host"]
        self._heartbeat_lag = Histogram(
            "vmm_agent_heartbeat_lag_seconds",
            "Seconds between when a heartbeat was due and when it was sent.", labels,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry).labels(host)
        self._last_heartbeat_lag = Gauge(
            "vmm_agent_heartbeat_last_lag_seconds",
            "Lag of the most recent heartbeat.", labels, registry=self.registry).labels(host)
        self.heartbeat_interval = Gauge(
            "vmm_agent_heartbeat_interval_seconds",
            "The heartbeat interval in effect (the controller's, else the configured one).",
            labels, registry=self.registry).labels(host)
        self._heartbeats = Counter("vmm_agent_heartbeats", "Heartbeats sent.", labels,
                                   registry=self.registry).labels(host)
        self._heartbeat_vm_entries = Counter(
            "vmm_agent_heartbeat_vm_entries", "Per-VM metrics entries sent in heartbeats.",
            labels, registry=self.registry).labels(host)
        self._heartbeat_bytes = Counter(
            "vmm_agent_heartbeat_bytes", "Serialized size of the heartbeats sent.", labels,
            registry=self.registry).labels(host)

    def heartbeat_sent(self, lag: float, entries: int, size: int) -> None:
        self._heartbeat_lag.observe(max(0.0, lag))
        self._last_heartbeat_lag.set(max(0.0, lag))
        self._heartbeats.inc()
        self._heartbeat_vm_entries.inc(entries)
        self._heartbeat_bytes.inc(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_listen(listen: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port", or ":port" for every address) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics_listen must be host:port, not {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@contextlib.asynccontextmanager
async def serve_metrics(telemetry: AgentTelemetry, listen: str
                        ) -> AsyncIterator[web.AppRunner | None]:
    """Serve GET /metrics on listen ("" serves nothing) for the life of the context."""
    if not listen:
        yield None
        return
    host, port = parse_listen(listen)

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=telemetry.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:  # e.g. a second agent on this machine: run without it
            log.warning("cannot serve Prometheus metrics on %s: %s", listen, exc)
            yield None
            return
        log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
        yield runner
    finally:
        await runner.cleanup()
