"""The firecracker benchmark: create-and-boot through the control plane vs the runtime alone,
CreateVm throughput, and RSS.

With a real firecracker binary (VMM_AGENT_FIRECRACKER_BINARY, else `firecracker` on PATH, found
the way the agent's runtime finds it) and a usable /dev/kvm, both sides boot the tiny guest
and count a VM as up once its ready marker is on the console. Otherwise both sides drive the
API simulator with a stand-in kernel, and the result says so.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import binary_from_environment
from agent.runtimes.base import RuntimeSettings
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.vm_dir import StateDir
from tools.bench.measure import rss_mib, summary_ms
from tools.fleet.cluster import GIB, Cluster
from tools.guests import images as guest_images
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

FAKE_KERNEL = b"\x7fELF stand-in kernel for the API simulator, with i8042\n"
# The controller's and the agent's default (later flags win over the cluster's debug).
LOG_LEVEL = ["--log-level", "info"]


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


def runtime_settings() -> RuntimeSettings:
    """What the agent would be configured with: the binary VMM_AGENT_FIRECRACKER_BINARY names,
    else whatever the runtime's own detection finds."""
    return RuntimeSettings(binary=binary_from_environment("firecracker") or None)


def real_firecracker() -> FirecrackerRuntime | None:
    """The runtime on a real firecracker binary that can boot a guest here, else None."""
    runtime = FirecrackerRuntime.detect(runtime_settings())
    if runtime is None or runtime.simulated or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None
    return runtime


def tiny_guest_config() -> vm_pb2.VmConfig:
    """The tiny guest, up once its marker is on the console (boot waits for it)."""
    guest = guest_images.tiny_guest(guest_images.default_cache_dir())
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count = 1
    config.memory.size_bytes = 128 << 20
    config.boot.kernel_path = str(guest.elf64)
    config.boot.kernel_args = "console=ttyS0"
    config.boot.boot_options["ready_marker"] = guest_images.TINY_GUEST_MARKER
    return config


class DirectRuntime:
    """Spawn, configure and start the hypervisor with the runtime alone: no control plane.
    The runtime's create and boot make exactly the API calls the agent's do (boot waits for
    the ready marker when the config names one)."""

    def __init__(self, config: vm_pb2.VmConfig, settings: RuntimeSettings, work: Path) -> None:
        runtime = FirecrackerRuntime.detect(settings)
        assert runtime is not None
        self.runtime, self.config = runtime, config
        self.state = StateDir(work)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def sample(self, i: int) -> float:
        return self.loop.run_until_complete(self._create_boot(f"direct-{i}"))

    async def _create_boot(self, vm_id: str) -> float:
        vm = self.state.vm(vm_id)
        vm.create()
        desired = agent_pb2.DesiredVm(vm_id=vm_id, generation=1, config=self.config,
                                      backend="firecracker", power_state=vm_pb2.VM_STATE_RUNNING)
        start = time.perf_counter()
        try:
            await self.runtime.create(vm, desired)
            await self.runtime.boot(vm, desired)
            return time.perf_counter() - start
        finally:
            await self.runtime.destroy(vm)
            vm.remove()


def control_plane_sample(cluster: Cluster, config: vm_pb2.VmConfig, i: int) -> float:
    """CreateVm + BootVm until the agent reports RUNNING (after the marker, when named)."""
    start = time.perf_counter()
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=f"lat-{i}", config=config))
    booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=f"lat-{i}"))
    elapsed = time.perf_counter() - start
    assert booted.state == vm_pb2.VM_STATE_RUNNING
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=f"lat-{i}", force=True))
    return elapsed


def create_boot_both(cluster: Cluster, direct: DirectRuntime, config: vm_pb2.VmConfig,
                     runs: int) -> tuple[list[float], list[float]]:
    """(direct, through the control plane) samples, taken in turn so that both see the
    same machine: a shared host's load drifts over the seconds a run takes."""
    direct_samples, through = [], []
    for i in range(runs + 1):  # the first run warms caches and is not counted
        direct_samples.append(direct.sample(i))
        through.append(control_plane_sample(cluster, config, i))
    return direct_samples[1:], through[1:]


def bench_firecracker(quick: bool) -> dict[str, Any]:
    runs = 10 if quick else 40
    real = real_firecracker()
    # Without a real binary the agent finds no firecracker either and drives the simulator.
    settings = runtime_settings() if real is not None else RuntimeSettings(force_simulator=True)
    # A short work dir: API socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        work = Path(tmp)
        config = tiny_guest_config() if real is not None else lambda_config(work / "files")
        direct_runtime = DirectRuntime(config, settings, work / "direct")
        cluster = Cluster(work / "cluster", operation_timeout=60)
        # Measured at the shipped log level: the test cluster's debug level logs every
        # hypervisor API request (httpx), which the direct side does not pay for.
        cluster.controller.argv += LOG_LEVEL
        agent_flags = [*LOG_LEVEL, "--firecracker-binary", real.binary] if real is not None \
            else [*LOG_LEVEL, "--force-simulator", "true"]
        try:
            cluster.start()
            agent = cluster.add_agent("bench-1", vcpus=4096, memory=4096 * GIB,
                                      extra=agent_flags, simulated=real is None)
            idle = {"controller_rss_mib": rss_mib(cluster.controller.pid),
                    "agent_rss_mib": rss_mib(agent.pid)}
            direct, through = create_boot_both(cluster, direct_runtime, config, runs)
            throughput = create_throughput(cluster, config, clients=16,
                                           total=48 if quick else 112)
            loaded = hundred_vms(cluster, config, 20 if quick else 100)
            loaded.update({"controller_rss_mib": rss_mib(cluster.controller.pid),
                           "agent_rss_mib": rss_mib(agent.pid)})
        finally:
            direct_runtime.close()
            cluster.close()
    d, c = summary_ms(direct), summary_ms(through)
    # Each pair was taken back to back: their difference sees one state of a drifting machine.
    paired = summary_ms([t - s for s, t in zip(direct, through, strict=True)])
    return {
        "backend": f"firecracker {real.version()} ({real.binary}), tiny guest to its ready "
        "marker" if real is not None else "firecracker (API simulator: no firecracker binary "
        "with a usable /dev/kvm; set VMM_AGENT_FIRECRACKER_BINARY or put firecracker on PATH)",
        "simulated": real is None,
        "create_boot_to_running": {"control_plane": c, "direct_runtime": d,
                                   "control_plane_share_p50_ms":
                                       round(c["p50_ms"] - d["p50_ms"], 2),
                                   "control_plane_share_p99_ms":
                                       round(c["p99_ms"] - d["p99_ms"], 2),
                                   "control_plane_share_paired_p50_ms": paired["p50_ms"],
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
