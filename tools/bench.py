"""`make bench`: measure the control plane and print the numbers; save them as JSON.

Each benchmark starts what it measures from scratch (real etcd, the controller and an
agent as separate processes) on loopback. Results go to var/bench/<name>.json.

    python -m tools.bench [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.runtimes.base import RuntimeSettings
from agent.runtimes.firecracker import FirecrackerRuntime
from agent.runtimes.qemu_accel import kvm_cpu_model, kvm_device_usable
from agent.vm_dir import StateDir
from tools.cluster import GIB, Cluster
from tools.guest_images import default_cache_dir, linux_guest, tiny_guest
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"
FAKE_KERNEL = b"\x7fELF stand-in kernel for the API simulator, with i8042\n"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 2),
            "p99_ms": round(percentile(ms, 0.99), 2), "mean_ms": round(statistics.mean(ms), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


def rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / (1 << 20), 1)


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


# ---- Firecracker (simulator) through the control plane vs directly ----------------------

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


# ---- QEMU with real guests: through the control plane vs started by hand ----------------

# How long a booted guest idles before its QEMU's memory is read.
IDLE_SETTLE_SECONDS = 3.0
QEMU_HOST = "bench-qemu"
# Where a VM's own paths stood in the command line taken from the agent.
QMP_SOCKET_PLACEHOLDER = "@QMP_SOCKET@"
CONSOLE_PLACEHOLDER = "@CONSOLE_LOG@"


@dataclass(frozen=True)
class QemuCase:
    name: str
    config: vm_pb2.VmConfig
    marker: str
    accel: str


def qemu_cases(qemu: str, cache: Path) -> tuple[list[QemuCase], dict[str, str]]:
    """The tiny guest under KVM and the Linux guest under TCG; and why any case is left out."""
    cases: list[QemuCase] = []
    skipped: dict[str, str] = {}
    tiny = tiny_guest(cache)
    if kvm_device_usable() and asyncio.run(kvm_cpu_model(qemu)) is not None:
        cases.append(QemuCase("tiny_guest_kvm", vm_pb2.VmConfig(
            cpu=vm_pb2.CpuConfig(vcpu_count=1),
            memory=vm_pb2.MemoryConfig(size_bytes=32 << 20),
            boot=vm_pb2.BootConfig(kernel_path=str(tiny.pvh32), boot_options={
                "ready_marker": tiny.marker, "accel": "kvm"})), tiny.marker, "kvm"))
    else:
        skipped["tiny_guest_kvm"] = ("/dev/kvm is missing or unusable, or QEMU cannot start "
                                     "a KVM vCPU on it")
    linux = linux_guest(cache)
    cases.append(QemuCase("linux_guest_tcg", vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=256 << 20),
        boot=vm_pb2.BootConfig(kernel_path=str(linux.bzimage), initrd_path=str(linux.initramfs),
                               kernel_args=linux.cmdline, boot_options={
                                   "ready_marker": linux.marker, "accel": "tcg"})),
        linux.marker, "tcg"))
    return cases, skipped


@dataclass(frozen=True)
class ControlPlaneBoot:
    create_seconds: float  # CreateVm: QEMU spawned paused, QMP answering
    boot_seconds: float  # BootVm: `cont`, then the marker on the console
    # The command line the agent ran, this VM's own paths replaced by placeholders.
    argv: list[str]
    rss_idle_mib: float | None

    @property
    def seconds(self) -> float:
        return self.create_seconds + self.boot_seconds


def control_plane_qemu_boot(cluster: Cluster, vm_id: str, case: QemuCase,
                            settle: bool) -> ControlPlaneBoot:
    """CreateVm, then BootVm until RUNNING (the agent waits for the marker); the idle RSS
    of the VM's QEMU when `settle`."""
    start = time.perf_counter()
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=case.config,
                                                backend="qemu", host_id=QEMU_HOST))
    created = time.perf_counter()
    booted = cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id))
    done = time.perf_counter()
    if booted.state != vm_pb2.VM_STATE_RUNNING:
        raise RuntimeError(f"{vm_id} booted into {vm_pb2.VmState.Name(booted.state)}")
    backend_info = cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id)).backend_info
    if backend_info["accel"] != case.accel:
        raise RuntimeError(f"{vm_id} runs under {backend_info['accel']}, not {case.accel}")
    pid = int(backend_info["pid"])
    vm_path = cluster.workdir / f"agent-{QEMU_HOST}" / "vms" / vm_id
    argv = [arg.replace(backend_info["api_socket"], QMP_SOCKET_PLACEHOLDER)
            .replace(str(vm_path / "console.log"), CONSOLE_PLACEHOLDER)
            for arg in psutil.Process(pid).cmdline()]
    rss = None
    if settle:
        time.sleep(IDLE_SETTLE_SECONDS)
        rss = rss_mib(pid)
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True))
    return ControlPlaneBoot(created - start, done - created, argv, rss)


def direct_qemu_boot(argv: list[str], marker: str, work: Path,
                     settle: bool) -> tuple[float, float | None]:
    """The agent's command line run by hand, without -S (so the guest starts at once):
    seconds from spawn to the marker on its serial console, and its idle RSS when `settle`."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    console = work / "console.log"
    console.touch()
    command = [arg.replace(QMP_SOCKET_PLACEHOLDER, str(work / "qmp.sock"))
               .replace(CONSOLE_PLACEHOLDER, str(console)) for arg in argv if arg != "-S"]
    needle = marker.encode()
    with open(work / "stderr.log", "wb") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr,
                                stderr=subprocess.STDOUT, cwd=work)
    try:
        with open(console, "rb") as out:
            seen = b""
            deadline = start + 120
            while needle not in seen:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"qemu started by hand never printed {marker!r}: "
                                       f"{(work / 'stderr.log').read_text()[-500:]}")
                seen = seen[-len(needle):] + out.read()
                if needle not in seen:
                    time.sleep(0.001)
        elapsed = time.perf_counter() - start
        rss = None
        if settle:
            time.sleep(IDLE_SETTLE_SECONDS)
            rss = rss_mib(proc.pid)
        return elapsed, rss
    finally:
        proc.kill()
        proc.wait()


def bench_qemu_case(cluster: Cluster, case: QemuCase, runs: int, work: Path) -> dict[str, Any]:
    """Alternate control-plane and by-hand boots, each by-hand run with the command line of
    the control-plane run before it. One extra run of each, first, warms the page cache and
    the agent's one-off KVM CPU model probe, and is not counted."""
    through: list[ControlPlaneBoot] = []
    direct: list[float] = []
    rss: dict[str, float | None] = {}
    for i in range(runs + 1):
        settle = i == 1
        boot = control_plane_qemu_boot(cluster, f"{case.name}-{i}", case, settle)
        by_hand, direct_rss = direct_qemu_boot(boot.argv, case.marker, work / case.name,
                                               settle)
        if i == 0:
            continue
        through.append(boot)
        direct.append(by_hand)
        if settle:
            rss = {"control_plane_mib": boot.rss_idle_mib, "direct_qemu_mib": direct_rss}
    c, d = summary_ms([b.seconds for b in through]), summary_ms(direct)
    argv = through[-1].argv
    machine = argv[argv.index("-machine") + 1].split(",")[0] if "-machine" in argv else ""
    return {
        "accel": case.accel, "machine": machine,
        "spawn_to_ready_marker": {
            "control_plane": c, "direct_qemu": d,
            "ratio_p50": round(c["p50_ms"] / d["p50_ms"], 2),
            "overhead_p50_ms": round(c["p50_ms"] - d["p50_ms"], 2),
            "control_plane_create_p50_ms": summary_ms([b.create_seconds
                                                       for b in through])["p50_ms"],
            "control_plane_boot_p50_ms": summary_ms([b.boot_seconds for b in through])["p50_ms"],
        },
        "rss_idle": {**rss, "settle_seconds": IDLE_SETTLE_SECONDS},
        "command_line": shlex.join(argv),
    }


def bench_qemu(quick: bool) -> dict[str, Any]:
    runs = 3 if quick else 5
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("the qemu benchmark needs qemu-system-x86_64 on PATH")
    cases, skipped = qemu_cases(qemu, default_cache_dir())
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    results: dict[str, Any] = {
        "backend": "qemu", "qemu_version": version[0] if version else "",
        "runs": runs,
        "method": "control_plane: CreateVm call until BootVm returns RUNNING (the agent "
                  "waits for the ready_marker on the console); direct_qemu: the agent's "
                  "qemu-system-x86_64 command line without -S, spawn until the marker is "
                  "in its console file",
    }
    with tempfile.TemporaryDirectory(prefix="bench-q-") as tmp:
        work = Path(tmp)
        # Short paths: QMP sockets live under the agent's state dir (Unix path limit).
        cluster = Cluster(work / "c", operation_timeout=120)
        try:
            cluster.start()
            cluster.add_agent(QEMU_HOST, vcpus=64, memory=64 * GIB, backends="qemu")
            for case in cases:
                results[case.name] = bench_qemu_case(cluster, case, runs, work / "direct")
        finally:
            cluster.close()
    for name, reason in skipped.items():
        results[name] = {"skipped": reason}
    return results


BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "firecracker": bench_firecracker,
    "qemu": bench_qemu,
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the benchmarks.")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        result = BENCHMARKS[name](args.quick)
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps(result, indent=2)
        print(text)
        (OUT / f"{name}.json").write_text(text + "\n")
        print(f"saved {OUT / f'{name}.json'}")


if __name__ == "__main__":
    main()
