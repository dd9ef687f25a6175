"""The agent benchmark: one agent with 1,000 running Firecracker VMs on its host.

The VMs are API-faithful simulated Firecracker instances, all served by one process
(tools.simulators.firecracker.many: a thousand simulator processes would not fit on a
small machine), each behind its own API socket with its own metrics file that FlushMetrics
appends to. The agent adopts them from its state dir as it adopts the VMs of a previous
run, and connects to a recording controller peer (tools.fleet.agent_peer) that sends it
HeartbeatSettings and keeps every heartbeat with its arrival time and size.

Measured: the heartbeat period (mean, p99) against its setting, the heartbeat payload per
VM, how many metrics samples each VM got, the agent's heartbeat lag as it reports it on
its Prometheus endpoint, and the agent's CPU use.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.hypervisors.firecracker_api import BootSource, FirecrackerApi, MachineConfig
from agent.runtimes.firecracker_config import instance_id
from agent.vm_dir import StateDir, VmDir
from tools.bench.firecracker import lambda_config
from tools.bench.measure import percentile
from tools.fleet.agent_peer import AgentPeer
from tools.fleet.cluster import ROOT
from tools.fleet.etcd_server import free_loopback_port
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2


class SimulatedHost:
    """count running simulated Firecracker VMs, recorded in an agent state dir as the
    agent records the VMs it runs, so that an agent started on state_dir adopts them."""

    def __init__(self, workdir: Path, count: int, prefix: str = "vm") -> None:
        self.workdir = workdir
        self.state = StateDir(workdir / "agent")
        self.vms = [self.state.vm(f"{prefix}-{i:04d}") for i in range(count)]
        self.config = vm_pb2.VmConfig()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.config = lambda_config(self.workdir)
        for vm in self.vms:
            vm.create()
            vm.api_socket.unlink(missing_ok=True)
            vm.metrics_file.touch()
        pairs = self.workdir / "instances.txt"
        pairs.write_text("".join(f"{vm.api_socket}:{instance_id(vm.vm_id)}\n"
                                 for vm in self.vms))
        ready = self.workdir / "simulators.ready"
        with open(self.workdir / "simulators.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.simulators.firecracker.many", "--ready",
                 str(ready), "--from", str(pairs)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the simulators did not start: see "
                                   f"{self.workdir / 'simulators.log'}")
            time.sleep(0.05)
        asyncio.run(self._boot_all())
        started_at = psutil.Process(self.proc.pid).create_time()
        for vm in self.vms:
            self.record(vm, self.proc.pid, started_at)

    async def _boot_all(self) -> None:
        limit = asyncio.Semaphore(32)

        async def boot(vm: VmDir) -> None:
            async with limit, FirecrackerApi(vm.api_socket) as api:
                await api.put_metrics(vm.metrics_file)
                await api.put_machine_config(MachineConfig(vcpu_count=1, mem_size_mib=128))
                await api.put_boot_source(BootSource(self.config.boot.kernel_path))
                await api.start_instance()

        await asyncio.gather(*(boot(vm) for vm in self.vms))

    def record(self, vm: VmDir, pid: int, started_at: float) -> None:
        """What the agent writes for a VM it booted: desired state, process, status."""
        desired = agent_pb2.DesiredVm(vm_id=vm.vm_id, generation=1,
                                      config=self.config, backend="firecracker",
                                      power_state=vm_pb2.VM_STATE_RUNNING)
        vm.save_desired(desired)
        vm.save_runtime({"backend": "firecracker", "simulated": True, "pid": pid,
                         "started_at": started_at, "api_socket": str(vm.api_socket),
                         "booted_at": time.time()})
        vm.save_status(agent_pb2.VmStatus(vm_id=vm.vm_id, observed_generation=1,
                                          state=vm_pb2.VM_STATE_RUNNING, pid=pid,
                                          backend="firecracker"))

    def desired_state(self) -> agent_pb2.ConnectResponse:
        return agent_pb2.ConnectResponse(desired_state=agent_pb2.DesiredState(
            vms=[d for d in (vm.load_desired() for vm in self.vms) if d is not None]))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_argv(controller: str, state_dir: Path, metrics_port: int,
               *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent.main", "--controller", controller,
            "--host-id", "bench-host", "--state-dir", str(state_dir),
            "--backends", "firecracker", "--force-simulator", "true",
            "--vcpus", "4096", "--memory-bytes", str(4096 << 30),
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "info", *extra]


def start_process(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)


def scrape(port: int) -> dict[str, float]:
    """The agent's Prometheus samples, unlabelled or summed over labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{", 1)[0]
        out[key] = out.get(key, 0.0) + float(value)
    return out


async def measure(host: SimulatedHost, interval: float, metrics_interval: float,
                  seconds: float, log: Path) -> dict[str, Any]:
    peer = AgentPeer(on_register=[
        agent_pb2.ConnectResponse(heartbeat_settings=agent_pb2.HeartbeatSettings(
            interval_seconds=interval, timeout_seconds=15.0)),
        host.desired_state()])
    address = await peer.start()
    port = free_loopback_port()
    argv = agent_argv(address, host.state.root, port,
                      "--heartbeat-interval", str(interval * 3),
                      "--metrics-interval", str(metrics_interval))
    agent = start_process(argv, log)
    try:
        await peer.wait_for(lambda: bool(peer.registrations), 120)
        registered = len(peer.registrations[0].vms)
        # One metrics round to settle in, then measure.
        await asyncio.sleep(metrics_interval + interval)
        prom_before = await asyncio.to_thread(scrape, port)
        first = len(peer.beats)
        cpu = psutil.Process(agent.pid)
        cpu_before, wall_before = sum(cpu.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(seconds)
        beats = peer.beats[first:]
        agent_cpu = (sum(cpu.cpu_times()[:2]) - cpu_before) / (time.monotonic() - wall_before)
        prom = await asyncio.to_thread(scrape, port)
    finally:
        agent.terminate()
        await asyncio.to_thread(agent.wait, 30)
        await peer.stop()
    periods = [b.at - a.at for a, b in itertools.pairwise(beats)]
    vms = len(host.vms)
    sizes = [b.size for b in beats]
    entries = [len(b.heartbeat.vms) for b in beats]
    sampled: dict[str, int] = {}
    for b in beats:
        for status in b.heartbeat.vms:
            sampled[status.vm_id] = sampled.get(status.vm_id, 0) + 1
    one_entry = max((s.ByteSize() for b in beats for s in b.heartbeat.vms), default=0)
    mean_period = statistics.mean(periods)
    lag_count = (prom.get("vmm_agent_heartbeat_lag_seconds_count", 0.0)
                 - prom_before.get("vmm_agent_heartbeat_lag_seconds_count", 0.0))
    lag_sum = (prom.get("vmm_agent_heartbeat_lag_seconds_sum", 0.0)
               - prom_before.get("vmm_agent_heartbeat_lag_seconds_sum", 0.0))
    return {
        "vms": vms, "vms_registered": registered,
        "heartbeat_interval_s": interval, "metrics_interval_s": metrics_interval,
        "window_s": seconds, "heartbeats": len(beats),
        "heartbeat_period": {
            "mean_s": round(mean_period, 4), "p50_s": round(percentile(periods, 0.5), 4),
            "p99_s": round(percentile(periods, 0.99), 4), "max_s": round(max(periods), 4),
            "min_s": round(min(periods), 4),
            "mean_vs_setting_pct": round((mean_period / interval - 1) * 100, 2),
            "p99_vs_setting_pct": round((percentile(periods, 0.99) / interval - 1) * 100, 2)},
        "heartbeat_payload": {
            "mean_bytes": round(statistics.mean(sizes), 1), "max_bytes": max(sizes),
            "bytes_per_vm_per_beat": round(statistics.mean(sizes) / vms, 2),
            "vm_entries_per_beat_mean": round(statistics.mean(entries), 1),
            "one_vm_entry_bytes_max": one_entry},
        "metrics_samples": {
            "vms_sampled_in_window": len(sampled),
            "per_vm_in_window_mean": round(statistics.mean(sampled.values()), 2)
            if sampled else 0,
            "expected_per_vm": round(seconds / metrics_interval, 2),
            "sample_failures_total": prom.get("vmm_agent_metrics_sample_failures_total", 0.0)},
        # Seconds between when each beat of the window was due and when it was sent.
        "agent_reported_heartbeat_lag": {
            "beats": int(lag_count),
            "mean_s": round(lag_sum / lag_count, 4) if lag_count else None,
            "last_s": round(prom.get("vmm_agent_heartbeat_last_lag_seconds", 0.0), 4)},
        "agent_cpu_cores": round(agent_cpu, 3),
    }


def bench_agent(quick: bool) -> dict[str, Any]:
    count = 200 if quick else 1000
    seconds = 20.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        work = Path(tmp)
        host = SimulatedHost(work / "host", count)
        try:
            started = time.perf_counter()
            host.start()
            setup = time.perf_counter() - started
            result = asyncio.run(measure(host, interval=2.0, metrics_interval=10.0,
                                         seconds=seconds, log=work / "agent.log"))
        except BaseException:
            log = work / "agent.log"
            if log.exists():
                print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            host.close()
    result["simulators"] = ("API-faithful Firecracker simulators, one process serving every "
                            "VM's API socket and metrics file")
    result["setup_s"] = round(setup, 1)
    return result
