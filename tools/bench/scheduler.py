"""The scheduler benchmark: placement decisions per second from the in-memory fleet index,
at 100, 1,000 and 10,000 hosts, on a spread fleet and on one 99 % full.

Hosts look as real ones do to the index: four models, each host's memory a few MiB off its
model's (as MemTotal is), and bridges of their own (as Docker makes) beside no fleet
network's."""

from __future__ import annotations

import random
import time
from typing import Any

from agent.runtimes.cloud_hypervisor_capabilities import cloud_hypervisor_capabilities
from agent.runtimes.firecracker import LIMITS as FC_LIMITS
from agent.runtimes.firecracker import SUPPORT_MATRIX as FC_MATRIX
from agent.runtimes.qemu.capabilities import LIMITS as QEMU_LIMITS
from agent.runtimes.qemu.capabilities import SUPPORT_MATRIX as QEMU_MATRIX
from controller.fleet import allocatable
from controller.fleet_index import FleetIndex
from controller.scheduler import Choice, HostView
from tools.fleet.hollow import mem_total
from vmm import features
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

GIB = 1 << 30
# Host shapes of a fleet bought in a few generations: (vCPUs, memory).
SHAPES = [(32, 128 * GIB), (64, 256 * GIB), (96, 384 * GIB), (128, 512 * GIB)]


def declared(name: str, limits: host_pb2.BackendLimits,
             matrix: tuple[tuple[str, host_pb2.Support.ValueType, str], ...]
             ) -> host_pb2.BackendCapabilities:
    return host_pb2.BackendCapabilities(
        backend=name, limits=limits, features=[features.feature(k, s, d) for k, s, d in matrix])


def backends() -> dict[str, host_pb2.Backend]:
    fc = declared(features.FIRECRACKER, FC_LIMITS, FC_MATRIX)
    return {
        features.FIRECRACKER: host_pb2.Backend(name=features.FIRECRACKER, version="1.14.2",
                                               capabilities=fc),
        features.CLOUD_HYPERVISOR: host_pb2.Backend(
            name=features.CLOUD_HYPERVISOR, version="53.0",
            capabilities=cloud_hypervisor_capabilities()),
        features.QEMU: host_pb2.Backend(name=features.QEMU, version="7.2",
                                        capabilities=declared(features.QEMU, QEMU_LIMITS,
                                                                     QEMU_MATRIX)),
    }


def fleet(hosts: int, full: bool, rnd: random.Random) -> FleetIndex:
    index = FleetIndex()
    index.track_bridges(frozenset())  # as a controller with no fleet network does
    offered = backends()
    for i in range(hosts):
        vcpus, dimms = SHAPES[i % len(SHAPES)]
        host_id = f"host-{i:05d}"
        # As hosts report their memory: each a few MiB apart.
        limit = allocatable(records_pb2.HostRecord(capacity=host_pb2.Resources(
            vcpus=vcpus, memory_bytes=mem_total(dimms, host_id))))
        memory = limit.memory_bytes
        if full and rnd.random() < 0.99:
            # Full: less room left than the smallest VM asked for below.
            used_vcpus, used_memory = vcpus, memory - rnd.randint(0, 255) * (1 << 20)
        else:
            used_vcpus = rnd.randint(0, vcpus // 2)
            used_memory = rnd.randint(0, memory // GIB // 2) * GIB
        index.upsert(HostView(host_id=host_id, ready=True, backends=offered,
                              allocatable_vcpus=vcpus, allocatable_memory=memory,
                              allocated_vcpus=used_vcpus, allocated_memory=used_memory,
                              # Docker's: one bridge of its own per host.
                              bridges=frozenset({"docker0", f"br-{i:012x}"})))
    return index


def configs(rnd: random.Random, n: int) -> list[vm_pb2.VmConfig]:
    out = []
    for _ in range(n):
        config = vm_pb2.VmConfig()
        config.cpu.vcpu_count = rnd.choice([1, 2, 2, 4])
        config.memory.size_bytes = rnd.choice([1, 2, 4, 8]) * GIB
        out.append(config)
    return out


def bench_scheduler(quick: bool) -> dict[str, Any]:
    rnd = random.Random(7)
    decisions = 2_000 if quick else 20_000
    preference = (features.FIRECRACKER, features.CLOUD_HYPERVISOR, features.QEMU)
    result: dict[str, Any] = {"decisions_per_case": decisions, "cases": []}
    for hosts in (100, 1_000, 10_000):
        for full in (False, True):
            index = fleet(hosts, full, rnd)
            asks = configs(rnd, decisions)
            placed = 0
            started = time.perf_counter()
            for config in asks:
                placed += isinstance(index.place(config, preference=preference), Choice)
            elapsed = time.perf_counter() - started
            case = {"hosts": hosts, "fleet": "99% full" if full else "spread",
                    "host_groups": index.group_count,
                    "decisions_per_s": round(decisions / elapsed),
                    "us_per_decision": round(elapsed / decisions * 1e6, 1),
                    "placed_fraction": round(placed / decisions, 3)}
            print(f"  {hosts:>6} hosts, {case['fleet']:>8}: {case['decisions_per_s']:>7} "
                  f"decisions/s ({case['us_per_decision']} us each, "
                  f"{index.group_count} host groups)", flush=True)
            result["cases"].append(case)
    return result
