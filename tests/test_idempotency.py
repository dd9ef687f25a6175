"""Operations are idempotent for the caller: a retried create returns the VM, a request_id
replays the first answer (AIP-155), a call racing an operation in progress waits for it or
answers a retryable code, and concurrent clients on one VM id leave it in the state of the
last acknowledged call with nothing stuck or leaked."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from tests.support import invariants
from tests.support.api import bad_fields
from tools.fleet.cluster import GIB, Cluster, wait_until
from vmm.v1 import vm_pb2, vm_pb2_grpc

S = vm_pb2
HOST = "h1"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("idempotency"), operation_timeout=20)
    try:
        cluster.start()
        cluster.add_agent(HOST, vcpus=64, memory=64 * GIB)
        yield cluster
    finally:
        cluster.close()


def pid_of(cluster: Cluster, vm_id: str) -> str:
    return cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id)).backend_info["pid"]


def test_a_retried_create_returns_the_vm_and_another_config_is_refused(
        shared: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    config = example("lambda-function")
    first = shared.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="again", config=config))
    retried = shared.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="again", config=config))
    assert retried == first
    other = vm_pb2.VmConfig()
    other.CopyFrom(config)
    other.cpu.vcpu_count += 1
    with pytest.raises(grpc.RpcError) as err:
        shared.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="again", config=other))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # A retried boot of a running VM succeeds without booting it again.
    assert shared.vms.BootVm(vm_pb2.BootVmRequest(vm_id="again")).success
    pid = pid_of(shared, "again")
    again = shared.vms.BootVm(vm_pb2.BootVmRequest(vm_id="again"))
    assert again.success and again.state == S.VM_STATE_RUNNING
    assert pid_of(shared, "again") == pid


def test_a_request_id_replays_the_first_answer(
        shared: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    shared.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="keyed", config=example("lambda-function")))
    shared.vms.BootVm(vm_pb2.BootVmRequest(vm_id="keyed"))
    before = pid_of(shared, "keyed")
    reboot = vm_pb2.RebootVmRequest(vm_id="keyed", force=True, request_id="reboot-1")
    first = shared.vms.RebootVm(reboot)
    after = pid_of(shared, "keyed")
    assert first.success and after != before  # Firecracker reboots into a new process
    assert shared.vms.RebootVm(reboot) == first
    assert pid_of(shared, "keyed") == after  # the retry did not reboot it again
    with pytest.raises(grpc.RpcError) as reused:
        shared.vms.RebootVm(vm_pb2.RebootVmRequest(vm_id="keyed", request_id="reboot-1"))
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(reused.value) == ["request_id"]
    with pytest.raises(grpc.RpcError) as bad:
        shared.vms.BootVm(vm_pb2.BootVmRequest(vm_id="keyed", request_id="no spaces"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(bad.value) == ["request_id"]


@dataclass(frozen=True)
class Call:
    op: str
    vm_id: str
    started: float
    ended: float
    ok: bool
    code: grpc.StatusCode | None


# What the VM is after each acknowledged call.
EFFECT = {"create": "exists", "boot": "RUNNING", "delete": "absent"}
# Codes a caller may see when calls race: retryable, or the VM is not there (yet / any more).
RACE_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE}


def test_concurrent_clients_on_one_vm_id_end_as_the_last_acknowledged_call(
        shared: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    config = example("lambda-function")
    ids = ["race-a", "race-b"]
    calls: list[Call] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 8

    def client(seed: int) -> None:
        rng = random.Random(seed)
        channel = grpc.insecure_channel(shared.address)
        api = vm_pb2_grpc.VmServiceStub(channel)
        while time.monotonic() < deadline:
            vm_id, op = rng.choice(ids), rng.choice(["create", "boot", "delete"])
            started = time.monotonic()
            try:
                if op == "create":
                    api.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config), timeout=30)
                elif op == "boot":
                    assert api.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id), timeout=30).success
                else:
                    assert api.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True),
                                        timeout=30).success
                ok, code = True, None
            except grpc.RpcError as err:
                ok, code = False, err.code()
            with lock:
                calls.append(Call(op, vm_id, started, time.monotonic(), ok, code))
        channel.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = {c.code for c in calls if not c.ok}
    assert refused <= RACE_CODES, [c for c in calls if c.code not in RACE_CODES | {None}]
    assert sum(c.ok for c in calls) > 20

    expected_present, expected_absent = set(), set()
    for vm_id in ids:
        done = [c for c in calls if c.vm_id == vm_id and c.ok]
        last = max(done, key=lambda c: c.ended)
        # The calls acknowledged while the last one ran may have been ordered either way.
        final = {EFFECT[c.op] for c in done if c.ended >= last.started}
        if final == {"absent"}:
            expected_absent.add(vm_id)
        elif "absent" not in final:
            expected_present.add(vm_id)
        fleet = invariants.converged([shared.etcd.endpoint],
                                     {HOST: shared.workdir / f"agent-{HOST}"}, timeout=30)
        record = fleet.records.get(vm_id)
        state = "absent" if record is None else S.VmState.Name(record.status.state)
        allowed = {"absent"} if final == {"absent"} else set()
        for effect in final:
            allowed |= {"VM_STATE_CREATED", "VM_STATE_RUNNING"} if effect == "exists" else \
                {f"VM_STATE_{effect}"} if effect == "RUNNING" else {"absent"}
        assert state in allowed, (vm_id, state, final, sorted(done, key=lambda c: c.ended)[-4:])
    invariants.converged([shared.etcd.endpoint], {HOST: shared.workdir / f"agent-{HOST}"},
                         present=expected_present, absent=expected_absent, timeout=30)



def test_a_force_delete_on_a_disconnected_host_keeps_its_capacity_until_the_host_confirms(
        shared: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    shared.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="fenced", config=example("lambda-function")))
    shared.vms.BootVm(vm_pb2.BootVmRequest(vm_id="fenced"))
    agent = shared.agents[HOST]
    agent.signal(signal.SIGKILL)  # the VM keeps running on the host
    wait_until(lambda: shared.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="fenced")).state
               == S.VM_STATE_UNKNOWN, timeout=30, what="the host to be seen as gone")
    assert shared.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="fenced", force=True)).success
    info = shared.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="fenced"))
    assert "reserved" in info.state_reason, info.state_reason
    fleet = asyncio.run(invariants.read_fleet([shared.etcd.endpoint]))
    assert fleet.records["fenced"].deleting
    held = fleet.records["fenced"].reserved.vcpus
    assert fleet.allocations[HOST].allocated.vcpus >= held > 0
    agent.start()  # the host returns, removes the VM and confirms
    invariants.converged([shared.etcd.endpoint], {HOST: shared.workdir / f"agent-{HOST}"},
                         absent={"fenced"}, timeout=30)
