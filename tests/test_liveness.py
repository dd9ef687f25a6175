"""Host liveness across controller replicas: one etcd lease per replica holds the alive
keys of its hosts, a dead replica's hosts come back on another replica, the controller
tells agents their heartbeat interval, and a crowd registering at once settles."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from controller.agent_hub import AgentHub
from controller.etcd import EtcdClient
from controller.liveness import HeartbeatPolicy
from controller.store import Store
from controller.telemetry import Telemetry
from controller.vm_cache import VmCache
from tools.fleet.cluster import GIB, Cluster, Process, wait_until
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc

ALIVE = "/vmm/alive/"
# The cluster's controllers run with --host-lease-ttl 3.
TTL = 3.0


def alive_leases(cluster: Cluster) -> dict[str, int]:
    """host id -> the lease its alive key is attached to."""
    async def read() -> dict[str, int]:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            kvs, _ = await client.get_prefix(ALIVE)
            return {kv.key.removeprefix(ALIVE): kv.lease for kv in kvs}

    return asyncio.run(read())


def lease_keys(cluster: Cluster, lease_id: int) -> set[str]:
    async def read() -> set[str]:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            info = await client.lease_time_to_live(lease_id, keys=True)
            return set(info.keys) if info else set()

    return asyncio.run(read())


def revoke(cluster: Cluster, lease_id: int) -> None:
    async def run() -> None:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            await client.lease_revoke(lease_id)

    asyncio.run(run())


def both(first: str, second: str) -> str:
    """A gRPC target that dials `first` and falls back to `second` (pick_first)."""
    return f"ipv4:{first},{second}"


def host_ready(address: str, host_id: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            host = host_pb2_grpc.HostServiceStub(channel).GetHost(
                host_pb2.GetHostRequest(host_id=host_id), timeout=5).host
        except grpc.RpcError:
            return False
    return host.health == host_pb2.HOST_HEALTH_READY


def two_replicas(cluster: Cluster) -> tuple[Process, str]:
    return cluster.add_controller("replica-b")


def test_one_lease_per_replica_holds_its_hosts_alive_keys(cluster: Cluster) -> None:
    _, b = two_replicas(cluster)
    a = cluster.address
    cluster.add_agent("a1", controller=both(a, b))
    cluster.add_agent("a2", controller=both(a, b))
    cluster.add_agent("b1", controller=both(b, a))
    cluster.add_agent("b2", controller=both(b, a))
    leases = wait_until(lambda: (lambda got: got if len(got) == 4 else None)(
        alive_leases(cluster)), what="four alive keys")
    assert isinstance(leases, dict)
    assert all(leases.values()), leases
    assert leases["a1"] == leases["a2"]
    assert leases["b1"] == leases["b2"]
    assert leases["a1"] != leases["b1"]
    assert lease_keys(cluster, leases["a1"]) == {ALIVE + "a1", ALIVE + "a2"}
    assert lease_keys(cluster, leases["b1"]) == {ALIVE + "b1", ALIVE + "b2"}


def test_a_session_that_closes_takes_its_alive_key_along(cluster: Cluster) -> None:
    agent = cluster.add_agent("h1")
    assert "h1" in alive_leases(cluster)
    cluster.add_agent("h2")
    agent.stop()
    wait_until(lambda: "h1" not in alive_leases(cluster), what="h1's alive key to go")
    assert "h2" in alive_leases(cluster)


def test_a_lost_replica_lease_is_granted_again_with_its_hosts_keys(cluster: Cluster) -> None:
    cluster.add_agent("h1")
    cluster.add_agent("h2")
    before = alive_leases(cluster)
    assert before["h1"] == before["h2"]
    revoke(cluster, before["h1"])  # as etcd does when the lease expires in a partition
    after = wait_until(lambda: (lambda got: got if len(got) == 2 and before["h1"] not in
                                got.values() else None)(alive_leases(cluster)),
                       timeout=4 * TTL + 10, what="the alive keys back on a new lease")
    assert isinstance(after, dict)
    assert after["h1"] == after["h2"]
    # The sessions never dropped.
    assert "h1 disconnected" not in cluster.controller.log.read_text()
    assert host_ready(cluster.address, "h1") and host_ready(cluster.address, "h2")


def test_hosts_of_a_killed_replica_are_ready_on_the_other_and_vms_keep_running(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    replica, b = two_replicas(cluster)
    a = cluster.address
    cluster.add_agent("a1", controller=both(a, b))
    cluster.add_agent("b1", controller=both(b, a))
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="steady",
                                                          config=example("ci-runner")))
    booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="steady"))
    assert booted.state == vm_pb2.VM_STATE_RUNNING
    host = created.placement.host_id
    assert host in ("a1", "b1")
    # Kill the replica the VM's host is connected to; watch from the other one.
    victim, survivor = (cluster.controller, b) if host == "a1" else (replica, a)
    wait_until(lambda: host_ready(survivor, host), what=f"{host} ready on the survivor")

    states: list[int] = []
    stop = threading.Event()

    def observe() -> None:
        with grpc.insecure_channel(survivor) as channel:
            vms = vm_pb2_grpc.VmServiceStub(channel)
            while not stop.is_set():
                with_state = vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="steady"), timeout=5)
                states.append(with_state.state)
                time.sleep(0.05)

    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    try:
        victim.signal(signal.SIGKILL)
        # Once the dead replica's lease has run out, the host's alive key is on the
        # survivor's lease, and the survivor holds its session.
        wait_until(lambda: host_ready(survivor, host) and host in alive_leases(cluster),
                   timeout=TTL + 20, what=f"{host} ready again on the survivor")
        time.sleep(TTL + 1)
        assert host_ready(survivor, host)
        leases = alive_leases(cluster)
        assert set(leases) == {"a1", "b1"}
        assert len(set(leases.values())) == 1  # both on the survivor's lease now
    finally:
        stop.set()
        watcher.join(10)
    assert states and set(states) == {vm_pb2.VM_STATE_RUNNING}, states
    with grpc.insecure_channel(survivor) as channel:
        final = vm_pb2_grpc.VmServiceStub(channel).GetVmInfo(
            vm_pb2.GetVmInfoRequest(vm_id="steady"))
    assert final.state == vm_pb2.VM_STATE_RUNNING


def registration(host_id: str) -> agent_pb2.ConnectRequest:
    return agent_pb2.ConnectRequest(register=agent_pb2.Register(
        host_id=host_id, hostname=host_id, agent_version="test",
        capacity=host_pb2.Resources(vcpus=4, memory_bytes=8 * GIB),
        cpu_overcommit_ratio=1.0, memory_overcommit_ratio=1.0))


async def raw_session(address: str, host_id: str, until: asyncio.Event | None = None
                      ) -> list[agent_pb2.ConnectResponse]:
    """A bare Connect stream: register, then read until heartbeat_settings arrives (and,
    given `until`, hold the stream open until it is set)."""
    async def requests() -> AsyncIterator[agent_pb2.ConnectRequest]:
        yield registration(host_id)
        await asyncio.Event().wait()

    seen: list[agent_pb2.ConnectResponse] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests())
        async for message in call:
            seen.append(message)
            if message.HasField("heartbeat_settings"):
                break
        if until is not None:
            await until.wait()
        call.cancel()
    return seen


def test_an_agent_is_told_its_heartbeat_interval_after_registering(cluster: Cluster) -> None:
    seen = asyncio.run(asyncio.wait_for(raw_session(cluster.address, "raw-1"), 20))
    kinds = [m.WhichOneof("message") for m in seen]
    assert kinds == ["desired_state", "heartbeat_settings"]
    settings = seen[-1].heartbeat_settings
    assert settings.interval_seconds == pytest.approx(2.0)  # the default, for a small fleet
    assert settings.timeout_seconds >= 15.0


def test_a_crowd_registering_at_once_is_connected_within_a_minute(cluster: Cluster) -> None:
    cluster.restart_controller_with(["--max-concurrent-registrations", "8",
                                     "--max-heartbeat-rate", "50"])
    crowd = 300

    async def storm() -> list[list[agent_pb2.ConnectResponse]]:
        hold = asyncio.Event()
        sessions = [asyncio.create_task(raw_session(cluster.address, f"crowd-{i}", hold))
                    for i in range(crowd)]
        try:
            async with asyncio.timeout(60):
                for _ in itertools.count():
                    if len(await alive_count()) == crowd:
                        break
                    await asyncio.sleep(0.2)
        finally:
            hold.set()
        return await asyncio.gather(*sessions)

    async def alive_count() -> list[str]:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            kvs, _ = await client.get_prefix(ALIVE)
            return [kv.key for kv in kvs]

    results = asyncio.run(storm())
    assert all(r and r[-1].HasField("heartbeat_settings") for r in results)
    # 300 hosts at 50 beats/s: the interval the latest sessions were told is stretched.
    intervals = [r[-1].heartbeat_settings.interval_seconds for r in results]
    assert max(intervals) >= 300 / 50 * 0.75


def test_heartbeat_interval_stretches_with_the_fleet_and_holds_within_hysteresis() -> None:
    policy = HeartbeatPolicy(base_interval=2.0, base_timeout=15.0, max_rate=1000.0)
    assert not policy.update(1500, now=0.0)  # under 2 s * 1000/s: the base interval holds
    assert (policy.interval, policy.advertised_timeout) == (2.0, 15.0)
    assert not policy.update(2400, now=0.0)  # 2.4 s is within 25 % of 2 s
    assert policy.update(5000, now=0.0)
    assert policy.interval == 5.0 and policy.advertised_timeout == pytest.approx(37.5)
    assert not policy.update(5600, now=1.0)
    assert policy.update(100, now=2.0)  # back to the base interval
    assert policy.interval == 2.0 and policy.advertised_timeout == 15.0
    # Agents still on the long interval keep the long timeout for one old timeout.
    assert policy.timeout(now=3.0) == pytest.approx(37.5)
    assert policy.timeout(now=2.0 + 37.5 + 0.1) == 15.0


async def test_the_hub_reports_host_changes_and_keeps_heartbeats_in_memory(
        etcd_client: EtcdClient) -> None:
    changes: list[str] = []
    store = Store(etcd_client)
    cache = VmCache(store)
    await cache.start()
    hub = AgentHub(store, cache, Telemetry(), 3, heartbeat_interval=0.1, heartbeat_timeout=0.4,
                   on_host_change=changes.append)
    await hub.start()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(hub, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    beats: asyncio.Queue[agent_pb2.ConnectRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[agent_pb2.ConnectRequest]:
        yield registration("mem-1")
        while True:
            yield await beats.get()

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests())
            async for message in call:
                if message.HasField("heartbeat_settings"):
                    assert message.heartbeat_settings.interval_seconds == pytest.approx(0.1)
                    assert message.heartbeat_settings.timeout_seconds == pytest.approx(0.4)
                    break
            assert changes == ["mem-1"]  # opened
            assert hub.heartbeat_timeout == pytest.approx(0.4)
            revision = (await etcd_client.status()).revision
            for _ in range(5):
                beats.put_nowait(agent_pb2.ConnectRequest(heartbeat=agent_pb2.Heartbeat(
                    health=host_pb2.HOST_HEALTH_READY)))
                await asyncio.sleep(0.05)
            assert (await etcd_client.status()).revision == revision  # no write per beat
            assert changes == ["mem-1"]
            await asyncio.sleep(1.0)  # silent past the timeout: degraded
            assert changes == ["mem-1", "mem-1"]
            assert hub.health_of(hub.sessions["mem-1"])[0] == host_pb2.HOST_HEALTH_DEGRADED
            beats.put_nowait(agent_pb2.ConnectRequest(heartbeat=agent_pb2.Heartbeat(
                health=host_pb2.HOST_HEALTH_READY)))
            for _ in range(50):
                if len(changes) == 3:
                    break
                await asyncio.sleep(0.02)
            assert changes == ["mem-1"] * 3  # heard from again
            assert hub.health_of(hub.sessions["mem-1"])[0] == host_pb2.HOST_HEALTH_READY
            call.cancel()
        for _ in range(100):
            if len(changes) == 4 and not (await etcd_client.get_prefix(ALIVE))[0]:
                break
            await asyncio.sleep(0.05)
        assert changes == ["mem-1"] * 4  # closed
        assert "mem-1" not in hub.sessions
        assert not (await etcd_client.get_prefix(ALIVE))[0]
    finally:
        await server.stop(None)
        await hub.stop()
        await cache.stop()
