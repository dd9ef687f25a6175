"""Chaos: a fleet of real processes (3 etcd members, 2 controller replicas, 3 agents) under
storms of creates, boots and deletes while an agent, a controller replica and the etcd raft
leader are each killed with SIGKILL and brought back. Afterwards the invariants hold and
every VM a client was told exists boots."""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from tests.support import invariants
from tools.fleet.cluster import GIB, Cluster, etcd_leader, wait_until
from vmm.v1 import vm_pb2, vm_pb2_grpc

HOSTS = ("h1", "h2", "h3")
STORM_SECONDS = 16.0
CLIENTS = 4
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
             grpc.StatusCode.DEADLINE_EXCEEDED}


class Client:
    """One caller that knows both replicas and fails over between them on a retryable
    error, retrying each call with its request id."""

    def __init__(self, addresses: list[str], seed: int) -> None:
        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.stubs = [vm_pb2_grpc.VmServiceStub(c) for c in self.channels]
        self.rng = random.Random(seed)
        self.turn = seed % len(self.stubs)
        self.ids = itertools.count()
        self.seed = seed

    def call(self, method: str, request: object, deadline: float) -> object:
        while True:
            stub = self.stubs[self.turn]
            try:
                return getattr(stub, method)(request, timeout=20)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                    raise
                self.turn = (self.turn + 1) % len(self.stubs)
                time.sleep(0.2)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def test_fleet_survives_killed_agent_controller_and_etcd_leader(
        tmp_path: Path, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster = Cluster(tmp_path, operation_timeout=10, etcd_members=3)
    config = example("lambda-function")
    created: set[str] = set()
    deleted: set[str] = set()
    lock = threading.Lock()
    try:
        cluster.start()
        _, replica_address = cluster.add_controller("replica-b")
        controllers = f"{cluster.address},{replica_address}"
        for host in HOSTS:
            cluster.add_agent(host, vcpus=64, memory=64 * GIB, controller=controllers,
                              extra=["--reconnect-backoff-max", "1"])
        stop_at = time.monotonic() + STORM_SECONDS

        def storm(seed: int) -> None:
            client = Client([cluster.address, replica_address], seed)
            try:
                while time.monotonic() < stop_at:
                    vm_id = f"c{seed}-{next(client.ids)}"
                    give_up = time.monotonic() + 60
                    client.call("CreateVm", vm_pb2.CreateVmRequest(
                        vm_id=vm_id, config=config, request_id=f"{vm_id}-create"), give_up)
                    with lock:
                        created.add(vm_id)
                    client.call("BootVm", vm_pb2.BootVmRequest(
                        vm_id=vm_id, request_id=f"{vm_id}-boot"), give_up)
                    if client.rng.random() < 0.4:
                        client.call("DeleteVm", vm_pb2.DeleteVmRequest(
                            vm_id=vm_id, force=True, request_id=f"{vm_id}-delete"), give_up)
                        with lock:
                            deleted.add(vm_id)
            finally:
                client.close()

        clients = [threading.Thread(target=storm, args=(seed,)) for seed in range(CLIENTS)]
        for t in clients:
            t.start()
        time.sleep(3)
        agent = cluster.agents["h2"]
        agent.signal(signal.SIGKILL)
        time.sleep(1)
        agent.start()
        time.sleep(3)
        cluster.controller.signal(signal.SIGKILL)
        time.sleep(1.5)
        cluster.controller.start()
        time.sleep(3)
        assert cluster.etcd_cluster is not None
        leader = wait_until(lambda: etcd_leader(cluster.etcd_cluster.members),  # type: ignore[union-attr]
                            what="an etcd leader")
        leader.kill()  # type: ignore[attr-defined]
        time.sleep(2)
        leader.start()  # type: ignore[attr-defined]
        for t in clients:
            t.join(120)
        assert not any(t.is_alive() for t in clients)
        assert len(created) >= 8, created

        agents = {host: tmp_path / f"agent-{host}" for host in HOSTS}
        present = created - deleted
        invariants.converged(cluster.etcd_endpoints, agents, present=present, absent=deleted,
                             timeout=90)
        api = cluster.vms
        for vm_id in sorted(present):
            booted = api.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id), timeout=30,
                                wait_for_ready=True)
            assert booted.success and booted.state == vm_pb2.VM_STATE_RUNNING, vm_id
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
