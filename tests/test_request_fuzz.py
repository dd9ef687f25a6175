"""2,000 random and mutated requests against a real controller and agent: bad values, huge
values, garbage bytes on the wire. None answers INTERNAL or UNKNOWN, both processes stay
up and healthy, nothing is logged as a traceback, and etcd holds exactly what ListVms shows.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.etcd import EtcdClient
from tests.conftest import FAKE_KERNEL
from tools.fleet.cluster import Cluster, wait_until
from vmm.v1 import host_pb2, vm_pb2

REQUESTS = 2000
SEED = 20261202
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
VM_IDS = ["fz-0", "fz-1", "fz-2", "fz-3"]


class Fuzzer:
    """Requests built from a seeded generator: valid ones mutated in one to three places."""

    def __init__(self, rng: random.Random, kernel: str) -> None:
        self.rng = rng
        self.kernel = kernel

    def text(self) -> str:
        r = self.rng
        return r.choice([
            "", "a", "fz-1", "fz-1\n", "UPPER", "-x", "x" * 63, "x" * 64, "x" * r.randint(1, 6000),
            "é" * r.randint(1, 2500), "a/../../etc/shadow", "/etc/shadow", "\x00", "a\x00b",
            " spaced ", "*", "ns.with.dots", "y" * 12000, "ü" * 5000, "%s%n", "\u202e",
            "a" * 300 + "/" + "b" * 300,
            "".join(chr(r.randint(1, 0x2FF)) for _ in range(r.randint(1, 80)))])

    def number(self, bits: int = 32) -> int:
        """An edge-case integer that fits a signed field of `bits` bits."""
        values = [0, 1, -1, 2, 7, 64, 65, 1000, 2**31 - 1, -(2**31), 128 << 20,
                  (128 << 20) + 1, 1 << 40, 2**62, -(2**63)]
        return self.rng.choice([v for v in values if -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)])

    def path(self) -> str:
        r = self.rng
        return r.choice([self.kernel, "relative/path", "/" + "c" * 256, "/dev/kmsg",
                         "/proc/self/environ", "/" + "/".join(["d"] * r.randint(1, 2000)),
                         self.text()])

    def base_config(self) -> vm_pb2.VmConfig:
        return vm_pb2.VmConfig(
            cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=64 << 20),
            boot=vm_pb2.BootConfig(kernel_path=self.kernel))

    def mutate(self, config: vm_pb2.VmConfig) -> None:
        r = self.rng
        choice = r.randrange(12)
        if choice == 0:
            config.cpu.vcpu_count = self.number()
        elif choice == 1:
            config.memory.size_bytes = self.number(64)
            config.memory.max_size_bytes = self.number(64) if r.random() < 0.3 else 0
            config.memory.hotplug_enabled = r.random() < 0.3
        elif choice == 2:
            config.boot.kernel_path = self.path()
        elif choice == 3:
            config.boot.kernel_args = self.text()
            config.boot.initrd_path = self.path() if r.random() < 0.5 else ""
        elif choice == 4:
            for _ in range(r.choice([1, 10, 65, 200])):
                config.metadata[self.text() or "k"] = self.text()
        elif choice == 5:
            for i in range(r.choice([1, 2, 65, 300])):
                config.storage.add(id=r.choice([f"d{i}", "d0", self.text()]), path=self.path(),
                                   is_root_device=r.random() < 0.5,
                                   interface_type=self.text()[:20])
        elif choice == 6:
            for i in range(r.choice([1, 3, 65, 200])):
                config.network.add(id=r.choice([f"n{i}", self.text()]),
                                   mac_address=r.choice(["52:54:00:12:34:56",
                                                         "52:54:00:12:34:56\n",
                                                         "01:00:00:00:00:01", self.text()]),
                                   tap_device=r.choice(["tap0", "t" * 16, self.text()]),
                                   interface_type=r.choice(["", "virtio", "vhost-user",
                                                            self.text()]))
        elif choice == 7:
            config.cpu.max_vcpu_count = self.number()
            config.cpu.topology.sockets = self.number()
            config.cpu.features[self.text() or "f"] = self.text()
        elif choice == 8:
            config.console.enabled = True
            config.console.output = self.path()
            config.console.console_type = self.text()
        elif choice == 9:
            config.memory.backing[self.text() or "b"] = self.text()
        elif choice == 10:
            config.boot.boot_options[self.text() or "o"] = self.text()
        else:
            config.ClearField(r.choice(["cpu", "memory", "boot"]))

    def create(self) -> vm_pb2.CreateVmRequest:
        r = self.rng
        config = self.base_config()
        for _ in range(r.randint(1, 3)):
            self.mutate(config)
        request = vm_pb2.CreateVmRequest(config=config, vm_id=r.choice([*VM_IDS, self.text()]))
        if not request.vm_id:
            request.vm_id = r.choice(VM_IDS)  # no unbounded number of generated ids
        if r.random() < 0.2:
            request.namespace = self.text()
        if r.random() < 0.2:
            request.backend = r.choice(["firecracker", "qemu", self.text()])
        if r.random() < 0.1:
            request.host_id = self.text()
        return request

    def vm_id(self) -> str:
        return self.rng.choice([*VM_IDS, self.text()])

    def other(self) -> tuple[str, Message]:
        r = self.rng
        disk = vm_pb2.StorageDevice(id=self.text(), path=self.path())
        nic = vm_pb2.NetworkInterface(id=self.text(), tap_device=self.text(),
                                      mac_address=self.text())
        return r.choice([
            ("/vmm.v1.VmService/GetVmInfo", vm_pb2.GetVmInfoRequest(vm_id=self.vm_id())),
            ("/vmm.v1.VmService/PauseVm", vm_pb2.PauseVmRequest(vm_id=self.vm_id())),
            ("/vmm.v1.VmService/ResumeVm", vm_pb2.ResumeVmRequest(vm_id=self.vm_id())),
            ("/vmm.v1.VmService/RebootVm", vm_pb2.RebootVmRequest(vm_id=self.vm_id())),
            ("/vmm.v1.VmService/DeleteVm", vm_pb2.DeleteVmRequest(vm_id=self.vm_id(),
                                                                  force=r.random() < 0.5)),
            ("/vmm.v1.VmService/ShutdownVm", vm_pb2.ShutdownVmRequest(
                vm_id=self.vm_id(), timeout_seconds=r.choice([-1, 0, 1, 2**31 - 1]),
                force=True)),
            ("/vmm.v1.VmService/ResizeVm", vm_pb2.ResizeVmRequest(
                vm_id=self.vm_id(), vcpu_count=self.number(), memory_size_bytes=self.number(64))),
            ("/vmm.v1.VmService/AttachDisk", vm_pb2.AttachDiskRequest(vm_id=self.vm_id(),
                                                                      device=disk)),
            ("/vmm.v1.VmService/DetachDisk", vm_pb2.DetachDiskRequest(
                vm_id=self.vm_id(), device_id=self.text())),
            ("/vmm.v1.VmService/AttachNetworkInterface", vm_pb2.AttachNetworkInterfaceRequest(
                vm_id=self.vm_id(), interface=nic)),
            ("/vmm.v1.VmService/MigrateVm", vm_pb2.MigrateVmRequest(
                vm_id=self.vm_id(), target_backend=self.text(), target_host_id=self.text())),
            ("/vmm.v1.VmService/GetConsoleLog", vm_pb2.GetConsoleLogRequest(
                vm_id=self.vm_id(), tail_lines=self.number() )),
            ("/vmm.v1.VmService/ListVms", vm_pb2.ListVmsRequest(
                page_size=self.number() , page_token=self.text(),
                namespace=r.choice(["", "*", self.text()]))),
            ("/vmm.v1.HostService/GetHost", host_pb2.GetHostRequest(host_id=self.text())),
            ("/vmm.v1.HostService/ListHosts", host_pb2.ListHostsRequest(
                page_size=self.number() , page_token=self.text())),
            ("/vmm.v1.HostService/GetBackendCapabilities",
             host_pb2.GetBackendCapabilitiesRequest(backend=self.text())),
        ])

    def garbage(self, valid: bytes) -> bytes:
        """Random bytes, or a valid request's bytes flipped, cut short or padded."""
        r = self.rng
        kind = r.randrange(4)
        if kind == 0:
            return r.randbytes(r.randint(1, 4096))
        if kind == 1 and valid:
            data = bytearray(valid)
            for _ in range(r.randint(1, 8)):
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            return bytes(data)
        if kind == 2 and len(valid) > 1:
            return valid[:r.randrange(1, len(valid))]
        return valid + r.randbytes(r.randint(1, 64))

    def requests(self, count: int) -> Iterator[tuple[str, bytes]]:
        """(method, wire bytes): creates, other RPCs, garbage, and a few over 1 MiB."""
        r = self.rng
        for i in range(count):
            if i % 400 == 399:
                yield "/vmm.v1.VmService/CreateVm", r.randbytes(1100 * 1024)
                continue
            method, message = (("/vmm.v1.VmService/CreateVm", self.create())
                               if r.random() < 0.4 else self.other())
            data = message.SerializeToString()
            yield method, self.garbage(data) if r.random() < 0.25 else data


@pytest.fixture
def fuzz_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, operation_timeout=5.0)
    try:
        c.start()
        c.add_agent("h1", vcpus=4, memory=4 << 30, backends="firecracker")
        yield c
    finally:
        c.close()


def etcd_vm_ids(cluster: Cluster) -> set[str]:
    async def read() -> set[str]:
        async with EtcdClient([cluster.etcd.endpoint]) as etcd:
            kvs, _ = await etcd.get_prefix("/vmm/vms/")
            return {kv.key.removeprefix("/vmm/vms/") for kv in kvs}

    return asyncio.run(read())


def test_random_and_mutated_requests_never_get_internal_or_unknown(
        fuzz_cluster: Cluster, tmp_path: Path) -> None:
    cluster = fuzz_cluster
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(FAKE_KERNEL)
    fuzzer = Fuzzer(random.Random(SEED), str(kernel))
    channel = cluster.channel
    assert channel is not None
    raw: dict[str, Callable[..., bytes]] = {}

    def call(item: tuple[str, bytes]) -> tuple[str, grpc.StatusCode, str]:
        method, data = item
        rpc = raw.get(method) or raw.setdefault(method, channel.unary_unary(
            method, request_serializer=None, response_deserializer=None))
        try:
            rpc(data, timeout=30)
        except grpc.RpcError as exc:
            return method, exc.code(), exc.details() or ""
        return method, grpc.StatusCode.OK, ""

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, fuzzer.requests(REQUESTS)))
    # Garbage on the agent stream too.
    connect = channel.stream_stream("/vmm.agent.v1.AgentService/Connect",
                                    request_serializer=None, response_deserializer=None)
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as err:
            list(connect(iter([fuzzer.garbage(b"\x0a\x04\x0a\x02h9")]), timeout=10))
        results.append(("Connect", err.value.code(), err.value.details() or ""))

    assert len(results) == REQUESTS + 5
    bad = [r for r in results if r[1] in NEVER]
    assert not bad, f"{len(bad)} answers were INTERNAL/UNKNOWN, e.g. {bad[:3]}"
    codes = {code for _, code, _ in results}
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # the 1.1 MiB requests
    # Every error message stays small, whatever the request held.
    assert max(len(details) for _, _, details in results) < 8192

    assert cluster.controller.proc is not None and cluster.controller.proc.poll() is None
    assert cluster.agents["h1"].proc is not None and cluster.agents["h1"].proc.poll() is None
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert cluster.wait_host_ready("h1").health == host_pb2.HOST_HEALTH_READY

    def listed() -> set[str]:
        page = cluster.vms.ListVms(vm_pb2.ListVmsRequest(namespace="*", page_size=1000))
        assert page.total_count == len(page.vms) <= len(VM_IDS)
        return {v.vm_id for v in page.vms}

    # Deletes the fuzz left in flight settle; then etcd and the API agree.
    wait_until(lambda: listed() == etcd_vm_ids(cluster), 30,
               what="ListVms to show exactly the VMs in etcd")
    log = cluster.controller.log.read_text(errors="replace")
    assert "Traceback" not in log
    # Hundreds of undecodable requests, logged at most once per 10 s.
    garbage_lines = log.count("undecodable request")
    assert 1 <= garbage_lines <= 2 + (time.monotonic() - started) / 10
