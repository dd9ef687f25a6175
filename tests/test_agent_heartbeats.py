"""The agent's heartbeats and metrics at host scale: real agent processes, a real gRPC
controller end (the project's controller, or a recording peer), simulated Firecracker VMs.

Nothing here asserts how long anything took: the checks count heartbeats and samples and
look at their order and content.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import psutil
import pytest
from tenacity import AsyncRetrying, RetryCallState

from agent.config import AgentConfig
from agent.runtimes.base import Runtime, RuntimeSettings
from agent.runtimes.cloud_hypervisor import CloudHypervisorRuntime
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.session import RECONNECT_BACKOFF_INITIAL, ControllerSession
from agent.vm_dir import StateDir
from tools.bench.agent import SimulatedHost, agent_argv, start_process
from tools.bench.firecracker import lambda_config
from tools.fleet.agent_peer import AgentPeer
from tools.fleet.cluster import Cluster, wait_until
from tools.fleet.etcd_server import free_loopback_port
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2


def scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition, None when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def settings(interval: float) -> agent_pb2.ConnectResponse:
    return agent_pb2.ConnectResponse(heartbeat_settings=agent_pb2.HeartbeatSettings(
        interval_seconds=interval, timeout_seconds=15.0))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def peer() -> AsyncIterator[AgentPeer]:
    p = AgentPeer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
def sim_host(tmp_path: Path) -> Iterator[SimulatedHost]:
    host = SimulatedHost(tmp_path / "host", 50)
    host.start()
    try:
        yield host
    finally:
        host.close()


async def test_agent_follows_heartbeat_settings_the_controller_sends(
        peer: AgentPeer, tmp_path: Path) -> None:
    # Configured to beat every 60 s: any beat within the test comes from the settings.
    peer.on_register.append(settings(0.1))
    port = free_loopback_port()
    agent = start_process(agent_argv(f"127.0.0.1:{peer.port}", tmp_path / "state", port,
                                     "--heartbeat-interval", "60"), tmp_path / "agent.log")
    try:
        await peer.wait_for(lambda: len(peer.beats) >= 5, 30)
        text = await asyncio.to_thread(scrape, port)
        assert sample(text, "vmm_agent_heartbeat_interval_seconds") == 0.1
        assert (sample(text, "vmm_agent_heartbeats_total") or 0) >= 5

        # New settings on the same stream replace the old.
        peer.send(settings(0.05))

        async def interval_now() -> float | None:
            return sample(await asyncio.to_thread(scrape, port),
                          "vmm_agent_heartbeat_interval_seconds")

        for _ in range(200):
            if await interval_now() == 0.05:
                break
            await asyncio.sleep(0.05)
        assert await interval_now() == 0.05
        assert len(peer.registrations) == 1
    finally:
        await asyncio.to_thread(stop, agent)


async def test_heartbeats_keep_coming_while_a_vm_does_not_answer_its_metrics(
        peer: AgentPeer, sim_host: SimulatedHost, tmp_path: Path) -> None:
    # One more VM, alive by its process, whose API socket accepts and never answers.
    hung = sim_host.state.vm("hung-vm")
    hung.create()
    hung.metrics_file.touch()
    held: list[tuple[int, int]] = []  # heartbeats seen when a FlushMetrics arrived and ended

    async def never_answer(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", request)
        body = await reader.readexactly(int(length.group(1)) if length else 0)
        at_start = len(peer.beats)
        await reader.read()  # until the agent gives up and closes the connection
        if b"FlushMetrics" in body:
            held.append((at_start, len(peer.beats)))

    server = await asyncio.start_unix_server(never_answer, path=str(hung.api_socket))
    assert sim_host.proc is not None
    running = sim_host.vms[0].load_runtime()
    sim_host.record(hung, sim_host.proc.pid, float(running["started_at"]))

    peer.on_register.append(settings(0.1))
    port = free_loopback_port()
    agent = start_process(agent_argv(
        f"127.0.0.1:{peer.port}", sim_host.state.root, port, "--heartbeat-interval", "60",
        "--metrics-interval", "3", "--metrics-concurrency", "4"), tmp_path / "agent.log")
    answering = {vm.vm_id for vm in sim_host.vms}

    def sampled() -> set[str]:
        return {s.vm_id for beat in peer.beats for s in beat.heartbeat.vms}

    try:
        await peer.wait_for(lambda: bool(held) and answering <= sampled(), 60)
        assert len(peer.registrations[0].vms) == len(answering) + 1
        # While the hung VM's sample was held, the agent kept beating.
        at_start, at_end = held[0]
        assert at_end - at_start >= 5, held
        # Each answering VM's metrics came from its own simulator's metrics file.
        assert hung.vm_id not in sampled()
        entries = [s for beat in peer.beats for s in beat.heartbeat.vms]
        assert all(s.metrics.uptime_seconds >= 0 and s.metrics.memory_usage_bytes > 0
                   for s in entries)
        # Each beat carries only what was sampled since the one before: no VM twice per
        # beat, and far fewer entries than VMs times beats.
        for beat in peer.beats:
            ids = [s.vm_id for s in beat.heartbeat.vms]
            assert len(ids) == len(set(ids))
        assert len(entries) < len(answering) * len(peer.beats) / 2
        text = await asyncio.to_thread(scrape, port)
        assert (sample(text, "vmm_agent_metrics_sample_failures_total") or 0) >= 1
        assert sample(text, "vmm_agent_vms", state="running") == len(answering) + 1
    finally:
        await asyncio.to_thread(stop, agent)
        server.close()


def test_agent_serves_per_vm_counters_and_follows_the_real_controller(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.restart_controller_with(["--heartbeat-interval", "0.2"])
    port = free_loopback_port()
    cluster.add_agent("h1", extra=["--heartbeat-interval", "60", "--metrics-interval", "0.5",
                                   "--metrics-listen", f"127.0.0.1:{port}"])
    config = lambda_config(tmp_path / "files")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="m1", config=config))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="m1"))

    def served() -> str | None:
        text = scrape(port)
        value = sample(text, "vmm_agent_vm_memory_usage_bytes", vm_id="m1",
                       backend="firecracker", host="h1")
        return text if value else None

    text = wait_until(served, timeout=30)
    assert isinstance(text, str)
    for name in ("vmm_agent_vm_cpu_usage_percent", "vmm_agent_vm_uptime_seconds",
                 "vmm_agent_vm_disk_read_bytes_total", "vmm_agent_vm_disk_written_bytes_total",
                 "vmm_agent_vm_network_receive_bytes_total",
                 "vmm_agent_vm_network_transmit_packets_total"):
        assert sample(text, name, vm_id="m1", backend="firecracker") is not None, name
    assert sample(text, "vmm_agent_vms", state="running") == 1
    assert sample(text, "vmm_agent_heartbeat_lag_seconds_count") is not None
    # The controller's interval, not the configured 60 s: heartbeats keep the host READY
    # and the controller still gets the VM's metrics from them.
    assert sample(text, "vmm_agent_heartbeat_interval_seconds") == 0.2
    beats = sample(text, "vmm_agent_heartbeats_total") or 0
    wait_until(lambda: (sample(scrape(port), "vmm_agent_heartbeats_total") or 0) >= beats + 5,
               timeout=30)
    wait_until(lambda: cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="m1"))
               .metrics.memory_usage_bytes > 0, timeout=30)
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="m1", force=True))


def test_metrics_listen_in_use_does_not_stop_the_agent(cluster: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster.add_agent("h1", extra=["--metrics-listen", f"127.0.0.1:{port}"])
        assert cluster.agents["h1"].proc is not None
        assert cluster.agents["h1"].proc.poll() is None


def test_reconnect_waits_of_many_agents_spread_over_the_backoff_window() -> None:
    config = AgentConfig(reconnect_backoff_max=30.0)
    wait = ControllerSession.backoff(cast(ControllerSession, SimpleNamespace(config=config)))
    state = RetryCallState(AsyncRetrying(), None, (), {})
    for attempt, bound in ((1, RECONNECT_BACKOFF_INITIAL), (4, 8 * RECONNECT_BACKOFF_INITIAL),
                           (20, 30.0)):
        state.attempt_number = attempt
        waits = [wait(state) for _ in range(10_000)]
        assert all(0 <= w <= bound for w in waits)
        # 10,000 agents at the same attempt: no tenth of the window holds a fifth of them.
        buckets = [0] * 10
        for w in waits:
            buckets[min(9, int(w / bound * 10))] += 1
        assert max(buckets) < 2_000, buckets


class CountingApi:
    """An HTTP/1.1 API socket that answers every request at once and counts connections."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.closed = 0
        self.requests = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests += 1
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        finally:
            writer.close()


@pytest.mark.parametrize("backend", ["firecracker", "cloud-hypervisor"])
async def test_metrics_reuse_one_connection_per_vm_and_close_it_when_the_vm_is_gone(
        backend: str, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    vm = state.vm("kept")
    vm.create()
    vm.metrics_file.touch()
    me = psutil.Process()
    runtime: Runtime
    if backend == "firecracker":
        runtime = FirecrackerRuntime("firecracker", True, RuntimeSettings())
        api = CountingApi(b"HTTP/1.1 204 \r\nConnection: keep-alive\r\n\r\n")
    else:
        runtime = CloudHypervisorRuntime("cloud-hypervisor", True, RuntimeSettings())
        body = b'{"_disk0": {"read_bytes": 512, "write_bytes": 0}}'
        api = CountingApi(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    # This test process stands in for the hypervisor process.
    vm.save_runtime({"backend": backend, "pid": me.pid, "started_at": me.create_time(),
                     "booted_at": me.create_time(), "phase": "booted"})
    server = await asyncio.start_unix_server(api, path=str(vm.api_socket))
    try:
        for _ in range(5):
            await runtime.metrics(vm)
        assert (api.requests, api.connections, api.closed) == (5, 1, 0)
        if backend == "cloud-hypervisor":
            assert (await runtime.metrics(vm)).storage_stats.bytes_read == 512
        # The process is gone: its connection is closed, and a new process gets a new one.
        vm.save_runtime({"backend": backend, "pid": me.pid, "started_at": 1.0})
        assert await runtime.metrics(vm) == vm_pb2.VmMetrics()
        for _ in range(50):
            if api.closed:
                break
            await asyncio.sleep(0.02)
        assert api.closed == 1
    finally:
        server.close()
