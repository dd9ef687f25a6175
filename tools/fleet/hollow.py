"""Hollow agents: many simulated hosts in one process, for fleet-scale tests and benchmarks.

Each hollow agent opens its own `vmm.agent.v1.AgentService/Connect` stream and speaks the
agent protocol as `agent/session.py` does: it registers with a capacity, overcommit ratios
and the three backends' real capability declarations (marked simulated), heartbeats on the
interval the controller sets, answers requests, and reports every desired generation as
carried out at once. No hypervisor runs; a VM is only the status the agent reports.

Many streams share a few gRPC channels (`agents_per_channel`); each channel is its own TCP
connection.

    python -m tools.fleet.hollow --controller 127.0.0.1:50051 --hosts 1000 --processes 4 \\
        --prefix hollow-

In a test or benchmark:

    async with HollowFleet(HollowFleetConfig(controller=address, hosts=100)) as fleet:
        await fleet.wait_connected()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from agent.runtimes.base import RuntimeSettings
from agent.runtimes.cloud_hypervisor import CloudHypervisorRuntime
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.runtimes.qemu.runtime import QemuRuntime
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2

log = logging.getLogger(__name__)
S = vm_pb2.VmState
GIB = 1 << 30
PAGE = 4096
HOLLOW_VERSION = "0.1.0-hollow"
# Until the controller sends heartbeat settings.
DEFAULT_HEARTBEAT_INTERVAL = 2.0
# Reconnect waits: up to RECONNECT_BACKOFF_INITIAL at first, doubling to at most the cap.
RECONNECT_BACKOFF_INITIAL = 0.5
RECONNECT_BACKOFF_MAX = 10.0


class StreamEnded(Exception):
    """The controller closed the stream; reconnect."""


@dataclass(frozen=True)
class HostSize:
    vcpus: int
    memory_bytes: int

    @classmethod
    def parse(cls, text: str) -> HostSize:
        """"64x256" -> 64 vCPUs, 256 GiB."""
        vcpus, _, gib = text.lower().partition("x")
        if not vcpus or not gib:
            raise ValueError(f"host size {text!r} is not VCPUSxGIB, e.g. 64x256")
        return cls(int(vcpus), int(float(gib) * GIB))


DEFAULT_SIZE = HostSize(64, 256 * GIB)


def mem_total(memory: int, host_id: str) -> int:
    """What a host with `memory` of DIMMs reports as its memory, as MemTotal does: the
    kernel and firmware keep 40 to 104 MiB, a different amount on each host."""
    kept_pages = zlib.crc32(host_id.encode()) % ((64 << 20) // PAGE)
    return memory - (40 << 20) - kept_pages * PAGE


def parse_sizes(text: str) -> list[HostSize]:
    """"64x256,16x64" -> hosts cycle through those sizes."""
    return [HostSize.parse(part) for part in text.split(",") if part.strip()]


@cache
def _declarations() -> tuple[bytes, ...]:
    settings = RuntimeSettings()
    runtimes = (FirecrackerRuntime("firecracker", True, settings),
                CloudHypervisorRuntime("cloud-hypervisor", True, settings),
                QemuRuntime("qemu-system-x86_64", True, settings))
    return tuple(host_pb2.Backend(name=r.name, simulated=True, version="hollow",
                                  binary_path="", capabilities=r.capabilities()
                                  ).SerializeToString() for r in runtimes)


def hollow_backends() -> list[host_pb2.Backend]:
    """Firecracker, Cloud Hypervisor and QEMU as their runtimes declare them, simulated."""
    return [host_pb2.Backend.FromString(data) for data in _declarations()]


def host_id(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}"


class HollowAgent:
    """One simulated host: a Connect stream that reconnects until stopped."""

    def __init__(self, host_id: str, size: HostSize, channel: grpc.aio.Channel, *,
                 token: str = "", cpu_overcommit: float = 1.0,
                 memory_overcommit: float = 1.0,
                 connect_gate: asyncio.Semaphore | None = None,
                 bridges: Sequence[str] = ()) -> None:
        self.host_id = host_id
        self.bridges = list(bridges)
        self.size = size
        self.channel = channel
        self.token = token
        self.cpu_overcommit = cpu_overcommit
        self.memory_overcommit = memory_overcommit
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.heartbeat_timeout = 0.0
        self.desired: dict[str, agent_pb2.DesiredVm] = {}
        self.status: dict[str, agent_pb2.VmStatus] = {}
        self.connected = asyncio.Event()
        self.registrations = 0
        self._gate = connect_gate
        self._interval_changed = asyncio.Event()
        self._outbound: asyncio.Queue[agent_pb2.ConnectRequest] | None = None

    # ---- what the agent says about itself --------------------------------------------

    def registration(self) -> agent_pb2.Register:
        return agent_pb2.Register(
            host_id=self.host_id, hostname=self.host_id,
            capacity=host_pb2.Resources(vcpus=self.size.vcpus,
                                        memory_bytes=mem_total(self.size.memory_bytes,
                                                               self.host_id)),
            cpu_overcommit_ratio=self.cpu_overcommit,
            memory_overcommit_ratio=self.memory_overcommit,
            backends=hollow_backends(), vms=list(self.status.values()),
            agent_version=HOLLOW_VERSION, labels={"hollow": "true"}, bridges=self.bridges)

    def _heartbeat_message(self) -> agent_pb2.ConnectRequest:
        used = sum(d.config.memory.size_bytes for _, d in self._running())
        metrics = host_pb2.HostMetrics(
            memory_used_bytes=used, memory_available_bytes=max(0, self.size.memory_bytes - used))
        vms = [agent_pb2.VmStatus(vm_id=s.vm_id, metrics=vm_pb2.VmMetrics())
               for s, _ in self._running()]
        return agent_pb2.ConnectRequest(heartbeat=agent_pb2.Heartbeat(
            health=host_pb2.HOST_HEALTH_READY, metrics=metrics, vms=vms))

    def _running(self) -> list[tuple[agent_pb2.VmStatus, agent_pb2.DesiredVm]]:
        return [(s, self.desired[vm_id]) for vm_id, s in self.status.items()
                if vm_id in self.desired and s.state in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED)]

    # ---- the stream -----------------------------------------------------------------

    async def run_forever(self) -> None:
        """Connect, and reconnect after random waits that grow to RECONNECT_BACKOFF_MAX
        (full jitter, so hosts of a restarted controller spread out); after an established
        stream ends the backoff starts over."""
        while True:
            try:
                async for attempt in AsyncRetrying(
                        wait=wait_random_exponential(multiplier=RECONNECT_BACKOFF_INITIAL / 2,
                                                     max=RECONNECT_BACKOFF_MAX),
                        reraise=True,
                        retry=retry_if_exception_type((grpc.aio.AioRpcError, OSError))):
                    with attempt:
                        await self._run_once()
            except StreamEnded:
                await asyncio.sleep(random.uniform(0, RECONNECT_BACKOFF_INITIAL))

    async def _run_once(self) -> None:
        outbound: asyncio.Queue[agent_pb2.ConnectRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[agent_pb2.ConnectRequest]:
            while True:
                yield await outbound.get()

        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        gate = self._gate
        if gate is not None:
            await gate.acquire()
        heartbeat: asyncio.Task[None] | None = None
        was_connected = False
        try:
            outbound.put_nowait(agent_pb2.ConnectRequest(register=self.registration()))
            call = agent_pb2_grpc.AgentServiceStub(self.channel).Connect(
                requests(), metadata=metadata)
            self._outbound = outbound
            heartbeat = asyncio.create_task(self._heartbeat(outbound))
            async for message in call:
                if not self.connected.is_set():
                    was_connected = True
                    self.connected.set()
                    self.registrations += 1
                    if gate is not None:
                        gate.release()
                        gate = None
                self._handle(message, outbound)
        finally:
            if gate is not None:
                gate.release()
            self._outbound = None
            self.connected.clear()
            if heartbeat is not None:
                heartbeat.cancel()
        if not was_connected:
            raise ConnectionResetError(f"the controller closed the stream of {self.host_id} "
                                       "before answering its registration")
        raise StreamEnded(f"the controller closed the stream of {self.host_id}")

    async def _heartbeat(self, outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        # A random phase, so thousands of hosts started together do not beat in step.
        first = True
        while True:
            interval = self.heartbeat_interval * (random.random() if first else 1.0)
            first = False
            self._interval_changed.clear()
            try:
                # asyncio.timeout, not wait_for: no task per beat of thousands of hosts.
                async with asyncio.timeout(interval):
                    await self._interval_changed.wait()
                continue  # a new interval: start the wait again with it
            except TimeoutError:
                outbound.put_nowait(self._heartbeat_message())

    # ---- desired state in, status out ------------------------------------------------

    def _handle(self, message: agent_pb2.ConnectResponse,
                outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        kind = message.WhichOneof("message")
        if kind == "desired_state":
            wanted = {vm.vm_id: vm for vm in message.desired_state.vms}
            for vm_id in list(self.status):
                if vm_id not in wanted:
                    self._remove(vm_id)
            for vm in wanted.values():
                self._set_desired(vm)
        elif kind == "desired_vm":
            self._set_desired(message.desired_vm)
        elif kind == "remove_vm":
            self._remove(message.remove_vm.vm_id)
        elif kind == "heartbeat_settings":
            settings = message.heartbeat_settings
            self.heartbeat_timeout = settings.timeout_seconds
            if settings.interval_seconds > 0 \
                    and settings.interval_seconds != self.heartbeat_interval:
                self.heartbeat_interval = settings.interval_seconds
                self._interval_changed.set()
        elif kind == "request":
            self._serve(message.request, outbound)

    def _set_desired(self, vm: agent_pb2.DesiredVm) -> None:
        current = self.desired.get(vm.vm_id)
        if current is not None and current.generation > vm.generation:
            return  # stale message
        self.desired[vm.vm_id] = vm
        last = self.status.get(vm.vm_id)
        if last is not None and last.observed_generation == vm.generation \
                and last.reboot_epoch == vm.reboot_epoch:
            self._report(last)  # level-triggered: say it again
            return
        status = agent_pb2.VmStatus(
            vm_id=vm.vm_id, observed_generation=vm.generation, backend=vm.backend,
            reboot_epoch=vm.reboot_epoch, backend_info={"simulated": "true"})
        target = vm.power_state
        if target == S.VM_STATE_SHUTDOWN:
            if last is None or last.state == S.VM_STATE_UNSPECIFIED:
                status.state = S.VM_STATE_UNSPECIFIED  # never created: nothing to stop
            else:
                status.state = S.VM_STATE_SHUTDOWN
                status.reason = "shut down on request"
        elif target in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED):
            status.state = target
            status.pid = _fake_pid(vm.vm_id)
        else:
            status.state = S.VM_STATE_CREATED
            status.pid = _fake_pid(vm.vm_id)
        self._report(status)

    def _remove(self, vm_id: str) -> None:
        self.desired.pop(vm_id, None)
        last = self.status.pop(vm_id, None)
        self._report(agent_pb2.VmStatus(vm_id=vm_id, removed=True,
                                        backend=last.backend if last else ""))

    def _report(self, status: agent_pb2.VmStatus) -> None:
        if not status.removed:
            self.status[status.vm_id] = status
        if self._outbound is not None:
            self._outbound.put_nowait(agent_pb2.ConnectRequest(vm_status=status))

    def _serve(self, request: agent_pb2.Request,
               outbound: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        kind = request.WhichOneof("kind")
        if kind == "cancel":
            return
        if kind == "preflight":
            reply = agent_pb2.Reply()  # no host-local files to check: no violations
        else:
            reply = agent_pb2.Reply(error_code="UNIMPLEMENTED",
                                    error=f"request {kind!r} is not served by a hollow host")
        reply.request_id = request.request_id
        outbound.put_nowait(agent_pb2.ConnectRequest(reply=reply))


def _fake_pid(vm_id: str) -> int:
    """A stable stand-in for the hypervisor's pid (no process runs)."""
    return 100_000 + zlib.crc32(vm_id.encode()) % 4_000_000


@dataclass
class HollowFleetConfig:
    controller: str
    hosts: int
    prefix: str = "hollow-"
    # Index of the first host (host ids are prefix + 5-digit index).
    first_index: int = 1
    # Hosts cycle through these sizes.
    sizes: Sequence[HostSize] = field(default_factory=lambda: [DEFAULT_SIZE])
    token: str = ""
    # Per-host agent tokens (an agent's credential speaks for one host); a host missing
    # here presents `token`.
    host_tokens: Mapping[str, str] = field(default_factory=dict)
    cpu_overcommit: float = 1.0
    memory_overcommit: float = 1.0
    agents_per_channel: int = 250
    # Streams being opened at once (a gate on registration, not on running streams).
    connect_concurrency: int = 200
    # Bridges every host reports (the fleet networks it offers).
    bridges: Sequence[str] = ()


def _channel_options(index: int) -> list[tuple[str, int | str]]:
    return [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1),
            # Each channel its own connection, not a shared subchannel.
            ("grpc.use_local_subchannel_pool", 1), ("vmm.hollow_channel", index)]


class HollowFleet:
    """N hollow agents in the current event loop."""

    def __init__(self, config: HollowFleetConfig) -> None:
        self.config = config
        self.channels: list[grpc.aio.Channel] = []
        self.agents: list[HollowAgent] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        cfg = self.config
        gate = asyncio.Semaphore(max(1, cfg.connect_concurrency))
        per_channel = max(1, cfg.agents_per_channel)
        sizes = list(cfg.sizes) or [DEFAULT_SIZE]
        for n in range(cfg.hosts):
            if n % per_channel == 0:
                self.channels.append(grpc.aio.insecure_channel(
                    cfg.controller, options=_channel_options(len(self.channels))))
            index = cfg.first_index + n
            name = host_id(cfg.prefix, index)
            self.agents.append(HollowAgent(
                name, sizes[(index - 1) % len(sizes)], self.channels[-1],
                token=cfg.host_tokens.get(name, cfg.token), cpu_overcommit=cfg.cpu_overcommit,
                memory_overcommit=cfg.memory_overcommit, connect_gate=gate,
                bridges=cfg.bridges))
        self._tasks = [asyncio.create_task(a.run_forever(), name=f"hollow-{a.host_id}")
                       for a in self.agents]

    def connected_count(self) -> int:
        return sum(a.connected.is_set() for a in self.agents)

    async def wait_connected(self, timeout: float = 60.0) -> None:
        """Until every agent's stream is up (the controller has answered its registration)."""
        await asyncio.wait_for(asyncio.gather(*(a.connected.wait() for a in self.agents)),
                               timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)
        self.channels = []

    async def __aenter__(self) -> HollowFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def list_hosts(stub: host_pb2_grpc.HostServiceStub,
                     timeout: float = 30.0) -> list[host_pb2.Host]:
    """Every host the controller lists, page by page."""
    hosts: list[host_pb2.Host] = []
    token = ""
    while True:
        page = await stub.ListHosts(host_pb2.ListHostsRequest(page_size=1000, page_token=token),
                                    timeout=timeout)
        hosts += page.hosts
        token = page.next_page_token
        if not token or not page.hosts:
            return hosts


async def ready_count(stub: host_pb2_grpc.HostServiceStub, prefix: str = "") -> int:
    """How many hosts (with ids starting with prefix) the HostService reports READY."""
    return sum(h.health == host_pb2.HOST_HEALTH_READY and h.host_id.startswith(prefix)
               for h in await list_hosts(stub))


# ---- the command ------------------------------------------------------------------------


async def _serve_slice(config: HollowFleetConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with HollowFleet(config) as fleet:
        started = time.monotonic()
        reported = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if not reported and fleet.connected_count() == config.hosts:
                reported = True
                print(f"hollow {config.prefix}{config.first_index:05d}+{config.hosts}: all "
                      f"connected in {time.monotonic() - started:.2f}s", flush=True)


def _slices(hosts: int, processes: int) -> list[tuple[int, int]]:
    """(offset, count) of each worker's share of the hosts."""
    processes = max(1, min(processes, hosts))
    base, extra = divmod(hosts, processes)
    out, offset = [], 0
    for i in range(processes):
        count = base + (1 if i < extra else 0)
        out.append((offset, count))
        offset += count
    return out


def _worker_argv(args: argparse.Namespace, first: int, count: int) -> list[str]:
    argv = [sys.executable, "-m", "tools.fleet.hollow", "--controller", args.controller,
            "--hosts", str(count), "--first-index", str(first), "--prefix", args.prefix,
            "--sizes", args.sizes, "--agents-per-channel", str(args.agents_per_channel),
            "--connect-concurrency", str(args.connect_concurrency),
            "--cpu-overcommit", str(args.cpu_overcommit),
            "--memory-overcommit", str(args.memory_overcommit), "--processes", "1"]
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fleet.hollow",
                                     description="Run hollow agents against a controller.")
    parser.add_argument("--controller", default="127.0.0.1:50051")
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes, each running a slice of the hosts")
    parser.add_argument("--prefix", default="hollow-")
    parser.add_argument("--first-index", type=int, default=1)
    parser.add_argument("--sizes", default="64x256",
                        help="host sizes as VCPUSxGIB, comma-separated; hosts cycle through them")
    parser.add_argument("--token", default=os.environ.get("VMM_AGENT_TOKEN", ""),
                        help="bearer token for a controller with auth (default $VMM_AGENT_TOKEN)")
    parser.add_argument("--cpu-overcommit", type=float, default=1.0)
    parser.add_argument("--memory-overcommit", type=float, default=1.0)
    parser.add_argument("--agents-per-channel", type=int, default=250)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parse_sizes(args.sizes)  # fail early on a bad size
    if args.processes <= 1:
        config = HollowFleetConfig(
            controller=args.controller, hosts=args.hosts, prefix=args.prefix,
            first_index=args.first_index, sizes=parse_sizes(args.sizes), token=args.token,
            cpu_overcommit=args.cpu_overcommit, memory_overcommit=args.memory_overcommit,
            agents_per_channel=args.agents_per_channel,
            connect_concurrency=args.connect_concurrency)
        asyncio.run(_serve_slice(config))
        return
    # The token goes to the workers through the environment, not their command lines.
    env = {**os.environ, "VMM_AGENT_TOKEN": args.token}
    workers = [subprocess.Popen(_worker_argv(args, args.first_index + offset, count), env=env)
               for offset, count in _slices(args.hosts, args.processes)]

    def forward(signum: int, _frame: object) -> None:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [w.wait() for w in workers]
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()
