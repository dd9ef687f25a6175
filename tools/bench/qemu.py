"""The qemu benchmark: real guests booted through the control plane vs the agent's own
QEMU command line started by hand."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.runtimes.qemu.accel import kvm_cpu_model, kvm_device_usable
from tools.bench.measure import rss_mib, summary_ms
from tools.fleet.cluster import GIB, Cluster
from tools.guests.images import default_cache_dir, linux_guest, tiny_guest
from vmm.v1 import vm_pb2

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
