"""The firecracker benchmark: create-and-boot through the control plane vs the runtime alone
(the simulator when no firecracker binary is installed), CreateVm throughput, and RSS."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.runtimes.base import RuntimeSettings
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.vm_dir import StateDir
from tools.bench.measure import rss_mib, summary_ms
from tools.fleet.cluster import GIB, Cluster
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

FAKE_KERNEL = b"\x7fELF stand-in kernel for the API simulator, with i8042\n"


def lambda_config(files: Path) -> vm_pb2.VmConfig:
    kernel = files / "vmlinux"
    if not kernel.exists():
        files.mkdir(parents=True, exist_ok=True)
        kernel.write_bytes(FAKE_KERNEL)
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count = 1
    config.memory.size_bytes = 128 << 20
    config.boot.kernel_path = str(kernel)
    config.boot.kernel_args = "console=ttyS0 reboot=k panic=1"
    return config


def direct_firecracker(config: vm_pb2.VmConfig, runs: int) -> list[float]:
    """Spawn, configure and start the hypervisor with the runtime alone: no control plane."""

    async def run() -> list[float]:
        runtime = FirecrackerRuntime.detect(RuntimeSettings())
        assert runtime is not None
        samples = []
        with tempfile.TemporaryDirectory(prefix="bench-fc-") as tmp:
            state = StateDir(Path(tmp))
            for i in range(runs + 1):  # the first run warms caches and is not counted
                vm = state.vm(f"direct-{i}")
                vm.create()
                desired = agent_pb2.DesiredVm(vm_id=vm.vm_id, generation=1, config=config,
                                              backend="firecracker",
                                              power_state=vm_pb2.VM_STATE_RUNNING)
                start = time.perf_counter()
                await runtime.create(vm, desired)
                await runtime.boot(vm, desired)
                samples.append(time.perf_counter() - start)
                await runtime.destroy(vm)
        return samples[1:]

    return asyncio.run(run())


def control_plane_firecracker(cluster: Cluster, config: vm_pb2.VmConfig,
                              runs: int) -> list[float]:
    samples = []
    for i in range(runs + 1):  # the first run warms caches and is not counted
        start = time.perf_counter()
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=f"lat-{i}", config=config))
        booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=f"lat-{i}"))
        samples.append(time.perf_counter() - start)
        assert booted.state == vm_pb2.VM_STATE_RUNNING
        cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=f"lat-{i}", force=True))
    return samples[1:]


def bench_firecracker(quick: bool) -> dict[str, Any]:
    runs = 10 if quick else 40
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        work = Path(tmp)
        config = lambda_config(work / "files")
        direct = direct_firecracker(config, runs)
        cluster = Cluster(work / "cluster", operation_timeout=60)
        try:
            cluster.start()
            agent = cluster.add_agent("bench-1", vcpus=4096, memory=4096 * GIB)
            idle = {"controller_rss_mib": rss_mib(cluster.controller.pid),
                    "agent_rss_mib": rss_mib(agent.pid)}
            through = control_plane_firecracker(cluster, config, runs)
            throughput = create_throughput(cluster, config, clients=16,
                                           total=48 if quick else 112)
            loaded = hundred_vms(cluster, config, 20 if quick else 100)
            loaded.update({"controller_rss_mib": rss_mib(cluster.controller.pid),
                           "agent_rss_mib": rss_mib(agent.pid)})
        finally:
            cluster.close()
    d, c = summary_ms(direct), summary_ms(through)
    return {
        "backend": "firecracker (API simulator: no firecracker binary)"
        if FirecrackerRuntime.detect(RuntimeSettings()).simulated  # type: ignore[union-attr]
        else "firecracker",
        "create_boot_to_running": {"control_plane": c, "direct_runtime": d,
                                   "ratio_p50": round(c["p50_ms"] / d["p50_ms"], 2),
                                   "ratio_p99": round(c["p99_ms"] / d["p99_ms"], 2)},
        "create_throughput": throughput,
        "rss_idle": idle,
        "rss_with_vms": loaded,
    }


def create_throughput(cluster: Cluster, config: vm_pb2.VmConfig, clients: int,
                      total: int) -> dict[str, Any]:
    """CreateVm calls per second from `clients` concurrent callers (each VM's hypervisor
    process is started and configured before CreateVm returns)."""
    ids = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        stub = cluster.vms
        while True:
            with lock:
                i = next(ids, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                stub.CreateVm(vm_pb2.CreateVmRequest(vm_id=f"tp-{i}", config=config))
            except Exception as exc:  # counted, not fatal: the number says how many failed
                errors.append(str(exc))
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for i in range(total):
        delete_quietly(cluster, f"tp-{i}")
    return {"clients": clients, "creates": total, "errors": len(errors),
            "seconds": round(elapsed, 2), "creates_per_second": round(total / elapsed, 1),
            "latency": summary_ms(latencies)}


def hundred_vms(cluster: Cluster, config: vm_pb2.VmConfig, count: int) -> dict[str, Any]:
    for i in range(count):
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=f"load-{i}", config=config))
        cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=f"load-{i}"))
    running = sum(1 for v in cluster.vms.ListVms(vm_pb2.ListVmsRequest(page_size=1000)).vms
                  if v.state == vm_pb2.VM_STATE_RUNNING)
    time.sleep(3)  # a few heartbeats with metrics of every VM
    return {"vms_running": running}


def delete_quietly(cluster: Cluster, vm_id: str) -> None:
    try:
        cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True))
    except Exception:  # already gone or never created
        pass
