"""The recovery benchmark: how long the fleet takes to serve again after a crash.

- agent restart: an agent with running VMs is killed (SIGKILL) and started again; the time
  until its host is ready again, which it is once every VM has been adopted (registration
  follows adoption and carries each VM's status);
- controller kill: one of two replicas is killed; the time until a client that fails over
  has a new VM created and booted through the other replica (the agent fails over too);
- etcd leader kill: the raft leader of three members is killed; the time until etcd accepts
  a write again, and until a CreateVm through the controller succeeds again.

All on the Firecracker API simulator: what is measured is the control plane's recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from controller.etcd import EtcdClient, EtcdError
from tools.bench.firecracker import LOG_LEVEL, lambda_config
from tools.bench.measure import summary_ms
from tools.fleet.cluster import GIB, Cluster, etcd_leader, wait_until
from vmm.v1 import host_pb2, vm_pb2, vm_pb2_grpc

HOST = "bench-host"
AGENT_FLAGS = [*LOG_LEVEL, "--reconnect-backoff-max", "0.5"]


def until(predicate: Callable[[], bool], timeout: float = 60.0) -> float:
    """Seconds until predicate() holds (polled every 5 ms)."""
    started = time.perf_counter()
    wait_until(predicate, timeout, interval=0.005, what="recovery")
    return time.perf_counter() - started


def boots(api: vm_pb2_grpc.VmServiceStub, vm_id: str, config: vm_pb2.VmConfig) -> bool:
    """Whether a new VM is created and booted through api right now."""
    try:
        api.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config), timeout=10)
        return api.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id), timeout=10).success
    except grpc.RpcError:
        return False


def boots_next(api: vm_pb2_grpc.VmServiceStub, names: Iterator[int],
               config: vm_pb2.VmConfig) -> bool:
    return boots(api, f"after-{next(names)}", config)


def agent_restart(work: Path, vms: int, runs: int) -> dict[str, Any]:
    cluster = Cluster(work / "agent", operation_timeout=30)
    config = lambda_config(work / "files")
    try:
        cluster.start()
        agent = cluster.add_agent(HOST, vcpus=256, memory=256 * GIB, extra=AGENT_FLAGS)
        for i in range(vms):
            cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=f"vm-{i}", config=config))
            cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=f"vm-{i}"))
        samples = []
        for _ in range(runs):
            agent.signal(signal.SIGKILL)
            wait_until(lambda: not host_ready(cluster), 30, what="the host to go")
            agent.start()
            samples.append(until(lambda: host_ready(cluster)))
        states = {v.state for v in cluster.vms.ListVms(vm_pb2.ListVmsRequest()).vms}
        assert states == {vm_pb2.VM_STATE_RUNNING}, states
        return {"vms": vms, "restart_to_all_adopted": summary_ms(samples)}
    finally:
        cluster.close()


def host_ready(cluster: Cluster) -> bool:
    try:
        host = cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id=HOST), timeout=2).host
    except grpc.RpcError:
        return False
    return host.health == host_pb2.HOST_HEALTH_READY


def controller_kill(work: Path, runs: int) -> dict[str, Any]:
    cluster = Cluster(work / "controller", operation_timeout=30)
    config = lambda_config(work / "files")
    names = itertools.count()
    try:
        cluster.start()
        replica, replica_address = cluster.add_controller("replica-b", LOG_LEVEL)
        cluster.add_agent(HOST, vcpus=256, memory=256 * GIB, extra=AGENT_FLAGS,
                          controller=f"{cluster.address},{replica_address}")
        replicas = [(cluster.controller, cluster.address), (replica, replica_address)]
        samples = []
        for run in range(runs):
            victim, _ = replicas[run % 2]
            _, survivor = replicas[(run + 1) % 2]
            with grpc.insecure_channel(survivor) as channel:
                api = vm_pb2_grpc.VmServiceStub(channel)
                assert boots(api, f"warm-{next(names)}", config)
                victim.signal(signal.SIGKILL)
                samples.append(until(partial(boots_next, api, names, config)))
            victim.start()
            with grpc.insecure_channel(replicas[run % 2][1]) as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
        return {"replicas": 2, "kill_to_served_by_other_replica": summary_ms(samples)}
    finally:
        cluster.close()


def etcd_leader_kill(work: Path, runs: int) -> dict[str, Any]:
    cluster = Cluster(work / "etcd", operation_timeout=30, etcd_members=3)
    config = lambda_config(work / "files")
    names = itertools.count()
    try:
        cluster.start()
        cluster.add_agent(HOST, vcpus=256, memory=256 * GIB, extra=AGENT_FLAGS)
        assert cluster.etcd_cluster is not None
        members = cluster.etcd_cluster.members
        writes, creates = [], []
        for _ in range(runs):
            leader = wait_until(lambda: etcd_leader(members), 30, what="an etcd leader")
            leader.kill()  # type: ignore[attr-defined]
            killed = time.perf_counter()
            writes.append(asyncio.run(first_write(cluster.etcd_endpoints)) - killed)
            until(lambda: boots(cluster.vms, f"vm-{next(names)}", config))
            creates.append(time.perf_counter() - killed)
            leader.start()  # type: ignore[attr-defined]
        return {"members": 3, "leader_kill_to_etcd_write": summary_ms(writes),
                "leader_kill_to_create_vm": summary_ms(creates)}
    finally:
        cluster.close()


async def first_write(endpoints: list[str]) -> float:
    """time.perf_counter() when a put through a client of every member first succeeds."""
    async with EtcdClient(endpoints, timeout=1.0) as etcd:
        while True:
            with contextlib.suppress(EtcdError, OSError):
                await etcd.put("/bench/recovery", b"x")
                return time.perf_counter()
            await asyncio.sleep(0.005)


def bench_recovery(quick: bool) -> dict[str, Any]:
    runs = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="vmm-recovery-") as tmp:
        work = Path(tmp)
        return {
            "agent": agent_restart(work, vms=5 if quick else 20, runs=runs),
            "controller": controller_kill(work, runs=runs),
            "etcd": etcd_leader_kill(work, runs=runs),
        }
