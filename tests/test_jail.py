"""Hypervisors run with least privilege: a uid of their own, in a cgroup limited to what
the VM's config implies, sandboxed where the hypervisor can be. Real processes, read from
/proc and the cgroup files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent import process
from agent.cgroups import CPU_PERIOD_US, Hierarchy, Limits, VmCgroups
from agent.jail import Confinement
from agent.runtimes.qemu.launch import SANDBOX
from tests.conftest import FAKE_KERNEL
from tools.fleet.cluster import ROOT, Cluster, wait_until
from tools.guests.images import TINY_GUEST_MARKER, TinyGuest, default_cache_dir, tiny_guest
from vmm.v1 import vm_pb2

MIB = 1 << 20
# An interpreter every uid can run: the project's own may live in a root-only home.
SYSTEM_PYTHON = Path("/usr/bin/python3")
SIMULATORS = {"firecracker": "tools.simulators.firecracker.main",
              "cloud-hypervisor": "tools.simulators.cloud_hypervisor.main"}
UIDS = (64100, 64109)
GID = 64100
OVERHEAD = 200 * MIB
PIDS_MAX = 300


@pytest.fixture
def jail_dir() -> Iterator[Path]:
    # Hypervisor uids must reach the state and image dirs: pytest's tmp_path lies under a
    # root-only directory, so this work dir is made traversable (not listable) instead.
    with tempfile.TemporaryDirectory(prefix="vmm-jail-") as tmp:
        os.chmod(tmp, 0o711)
        yield Path(tmp)


def untraversable_parent(path: Path) -> Path | None:
    """The first directory on the way to path that other users cannot enter, if any."""
    for directory in [*reversed(path.parents), path]:
        if not os.stat(directory).st_mode & 0o001:
            return directory
    return None


@pytest.fixture
def jailed_cluster(jail_dir: Path) -> Iterator[Cluster]:
    if Hierarchy.detect() is None:
        pytest.skip("needs cgroups with the cpu, memory and pids controllers")
    if blocked := untraversable_parent(ROOT):
        # The unprivileged hypervisors read the simulators and guest images from the checkout.
        pytest.skip(f"needs a checkout other uids can reach: {blocked} is not traversable "
                    "by them (mode 0700, as mktemp -d makes); clone it under a world-readable "
                    "directory")
    cluster = Cluster(jail_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def simulator_binaries(workdir: Path) -> list[str]:
    """The simulators as executables on an interpreter the hypervisor uids can run: flags
    that configure them as each backend's binary."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON} to run the simulators as unprivileged uids")
    bin_dir = workdir / "bin"
    bin_dir.mkdir(mode=0o755)
    flags = []
    for backend, module in SIMULATORS.items():
        script = bin_dir / f"{backend}-sim"
        script.write_text(f"#!{SYSTEM_PYTHON}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                          f"from {module} import main\nsys.exit(main())\n")
        script.chmod(0o755)
        flags += [f"--{backend}-binary", str(script)]
    return flags


def add_jailed_agent(cluster: Cluster, backends: str, extra: list[str] | None = None) -> None:
    cluster.add_agent("j1", backends=backends, jailed=True, simulated=False,
                      host_path_roots=[cluster.workdir / "files", default_cache_dir()],
                      extra=[*(extra or []), "--hypervisor-uids", f"{UIDS[0]}-{UIDS[1]}",
                             "--hypervisor-gid", str(GID),
                             "--hypervisor-memory-overhead-bytes", str(OVERHEAD),
                             "--hypervisor-pids-max", str(PIDS_MAX)])


def hypervisor_pid(cluster: Cluster, vm_id: str) -> int:
    runtime = cluster.workdir / "agent-j1" / "vms" / vm_id / "runtime.json"
    return int(json.loads(runtime.read_text())["pid"])


def proc_ids(pid: int, key: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """controller -> the directory of the process's group in that controller."""
    hierarchy = Hierarchy.detect()
    assert hierarchy is not None
    found: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if not controllers and hierarchy.version == 1:
            continue  # the unified hierarchy's line, which holds no controller here
        for controller in controllers.split(",") if controllers else list(hierarchy.mounts):
            if controller in hierarchy.mounts:
                found[controller] = hierarchy.mounts[controller] / group.lstrip("/")
    return found


def limits(dirs: dict[str, Path]) -> dict[str, int]:
    def read(controller: str, v1: str, v2: str) -> str:
        d = dirs[controller]
        return ((d / v1) if (d / v1).exists() else (d / v2)).read_text().split()[0]

    cpu = dirs["cpu"]
    if (cpu / "cpu.max").exists():
        quota, period = (cpu / "cpu.max").read_text().split()
    else:
        quota = (cpu / "cpu.cfs_quota_us").read_text()
        period = (cpu / "cpu.cfs_period_us").read_text()
    return {"quota": int(quota), "period": int(period),
            "memory": int(read("memory", "memory.limit_in_bytes", "memory.max")),
            "pids": int(read("pids", "pids.max", "pids.max"))}


def assert_jailed(cluster: Cluster, vm_id: str, vcpus: int, memory: int) -> dict[str, Path]:
    pid = hypervisor_pid(cluster, vm_id)
    uids, gids = proc_ids(pid, "Uid"), proc_ids(pid, "Gid")
    assert len(set(uids)) == 1 and UIDS[0] <= uids[0] <= UIDS[1], uids  # real..fs
    assert set(gids) == {GID}, gids
    # No supplementary group but the one that may open /dev/kvm.
    assert set(proc_ids(pid, "Groups")) <= {Path("/dev/kvm").stat().st_gid}
    dirs = cgroup_dirs(pid)
    assert {"cpu", "memory", "pids"} <= dirs.keys()
    assert all(d.name == vm_id for d in dirs.values()), dirs
    assert limits(dirs) == {"quota": vcpus * CPU_PERIOD_US, "period": CPU_PERIOD_US,
                            "memory": memory + OVERHEAD, "pids": PIDS_MAX}
    return dirs


def simulator_config(files: Path, vcpus: int) -> vm_pb2.VmConfig:
    files.mkdir(exist_ok=True)
    (files / "vmlinux").write_bytes(FAKE_KERNEL)
    disk = files / f"root-{vcpus}.img"
    with open(disk, "wb") as f:
        f.truncate(MIB)
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=vcpus), memory=vm_pb2.MemoryConfig(size_bytes=512 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(files / "vmlinux"), kernel_args="console=ttyS0"),
        storage=[vm_pb2.StorageDevice(id="root", path=str(disk), is_root_device=True)])


def delete_and_check_gone(cluster: Cluster, vm_id: str, dirs: dict[str, Path]) -> None:
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True))
    wait_until(lambda: not any(d.exists() for d in dirs.values()), timeout=30,
               what=f"the cgroup of {vm_id} to be removed")


def test_simulated_hypervisors_run_as_their_own_uid_in_a_limited_cgroup(
        jailed_cluster: Cluster) -> None:
    add_jailed_agent(jailed_cluster, "firecracker,cloud-hypervisor",
                     simulator_binaries(jailed_cluster.workdir))
    files = jailed_cluster.workdir / "files"
    vms = {"fc-1": ("firecracker", 2), "ch-1": ("cloud-hypervisor", 1)}
    disks, dirs, uids = {}, {}, {}
    for vm_id, (backend, vcpus) in vms.items():
        config = simulator_config(files, vcpus)
        jailed_cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                           backend=backend))
        # Confined once created, not only once booted (the move may end after the start).
        assert_jailed(jailed_cluster, vm_id, vcpus, 512 * MIB)
        jailed_cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id))
        dirs[vm_id] = assert_jailed(jailed_cluster, vm_id, vcpus, 512 * MIB)
        pid = hypervisor_pid(jailed_cluster, vm_id)
        uids[vm_id] = proc_ids(pid, "Uid")[0]
        disks[vm_id] = Path(config.storage[0].path)
        assert disks[vm_id].stat().st_uid == uids[vm_id], "the writable disk is the VM's"
        if backend == "cloud-hypervisor":
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--seccomp") + 1] == b"true"
    assert len(set(uids.values())) == len(vms), "one uid per VM"
    # The sockets dir lets hypervisors make their sockets, and remove only their own.
    sockets = jailed_cluster.workdir / "agent-j1" / "sockets"
    assert (sockets.stat().st_gid, sockets.stat().st_mode & 0o7777) == (GID, 0o1770)

    # A restarted agent removes a group of no VM and keeps those of the VMs it adopts.
    stray = [d.parent / "no-such-vm" for d in dirs["fc-1"].values()]
    for d in stray:
        d.mkdir(exist_ok=True)
    agent = jailed_cluster.agents["j1"]
    agent.signal(9)
    agent.start()
    jailed_cluster.wait_host_ready("j1")
    wait_until(lambda: not any(d.exists() for d in stray), timeout=30,
               what="the stray cgroup to be removed")
    for vm_id, (_, vcpus) in vms.items():
        assert assert_jailed(jailed_cluster, vm_id, vcpus, 512 * MIB) == dirs[vm_id]

    for vm_id in vms:
        delete_and_check_gone(jailed_cluster, vm_id, dirs[vm_id])
        assert disks[vm_id].stat().st_uid == 0, "the disk's owner is restored on delete"


def test_qemu_runs_the_tiny_guest_under_kvm_unprivileged_and_sandboxed(
        jailed_cluster: Cluster, tiny: TinyGuest, kvm: None) -> None:
    add_jailed_agent(jailed_cluster, "qemu")
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=32 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(tiny.pvh32), boot_options={
            "ready_marker": tiny.marker, "accel": "kvm"}))
    jailed_cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="q-1", config=config))
    booted = jailed_cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="q-1"))
    assert booted.state == vm_pb2.VM_STATE_RUNNING  # the guest printed its marker
    dirs = assert_jailed(jailed_cluster, "q-1", 1, 32 * MIB)
    argv = Path(f"/proc/{hypervisor_pid(jailed_cluster, 'q-1')}/cmdline").read_bytes()
    assert f"\0-sandbox\0{SANDBOX}\0".encode() in argv
    assert b"elevateprivileges=deny" in argv and b"spawn=deny" in argv
    delete_and_check_gone(jailed_cluster, "q-1", dirs)


def test_cloud_hypervisor_simulator_takes_seccomp_and_landlock_as_v53_does() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tools.simulators.cloud_hypervisor", *args,
                               "--version"],
                              capture_output=True, text=True, timeout=30)

    good = ["--seccomp", "log", "--landlock", "--landlock-rules", "path=/tmp,access=rw"]
    assert run(*good).returncode == 0, good
    for bad in (["--seccomp", "maybe"], ["--landlock=yes"]):
        refused = run(*bad)
        assert refused.returncode == 2 and "--" in refused.stderr, (bad, refused.stderr)


JAILER = os.environ.get("VMM_JAILER_BINARY") or shutil.which("jailer")
FIRECRACKER = os.environ.get("VMM_FIRECRACKER_BINARY") or shutil.which("firecracker")


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="Firecracker needs /dev/kvm")
@pytest.mark.skipif(FIRECRACKER is None, reason="the jailer needs a real Firecracker: set "
                    "VMM_FIRECRACKER_BINARY or put firecracker on PATH")
@pytest.mark.skipif(JAILER is None, reason="no Firecracker jailer: set VMM_JAILER_BINARY "
                    "or put jailer on PATH")
def test_firecracker_under_the_jailer_boots_pauses_is_adopted_and_leaves_nothing(
        jailed_cluster: Cluster) -> None:
    chroot_base = jailed_cluster.workdir / "jailer"
    add_jailed_agent(jailed_cluster, "firecracker", [
        "--firecracker-binary", str(FIRECRACKER), "--jailer-binary", str(JAILER),
        "--jailer-chroot-base", str(chroot_base)])
    guest = tiny_guest(default_cache_dir())
    disk = jailed_cluster.workdir / "files" / "scratch.img"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.truncate(MIB)
    config = vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=128 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(guest.elf64), kernel_args="console=ttyS0",
                               boot_options={"ready_marker": TINY_GUEST_MARKER}),
        storage=[vm_pb2.StorageDevice(id="scratch", path=str(disk))])
    vms = jailed_cluster.vms
    vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="jailed", config=config))
    assert vms.BootVm(vm_pb2.BootVmRequest(vm_id="jailed")).state == vm_pb2.VM_STATE_RUNNING
    pid = hypervisor_pid(jailed_cluster, "jailed")
    root = chroot_base / "firecracker" / "jailed" / "root"
    # Chrooted (pivot_root in a mount namespace of its own): its / holds the jail's files.
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert Path(f"/proc/{pid}/root/kernel").is_file()
    assert not Path(f"/proc/{pid}/root/etc").exists()
    assert {"dev", "drive-0", "kernel", "run"} <= {p.name for p in root.iterdir()}
    dirs = assert_jailed(jailed_cluster, "jailed", 1, 128 * MIB)
    assert vms.PauseVm(vm_pb2.PauseVmRequest(vm_id="jailed")).state == vm_pb2.VM_STATE_PAUSED

    agent = jailed_cluster.agents["j1"]
    agent.signal(9)
    agent.start()
    jailed_cluster.wait_host_ready("j1")
    info = vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="jailed"))
    assert info.state == vm_pb2.VM_STATE_PAUSED, info.state_reason
    assert hypervisor_pid(jailed_cluster, "jailed") == pid, "the jailed process was adopted"
    assert vms.ResumeVm(vm_pb2.ResumeVmRequest(vm_id="jailed")).state == \
        vm_pb2.VM_STATE_RUNNING

    delete_and_check_gone(jailed_cluster, "jailed", dirs)
    wait_until(lambda: not any(chroot_base.iterdir()), timeout=30,
               what="the chroot base to be empty")
    assert disk.stat().st_uid == 0


@pytest.mark.parametrize("waiter", ["fresh", "standby"])
def test_a_hypervisor_is_born_in_its_cgroup_and_a_refused_join_starts_nothing(
        tmp_path: Path, waiter: str) -> None:
    """On cgroup v1 the waiter writes itself into the group before it starts the process
    (no move by pid, whose lock waits out an RCU grace period); on v2 the agent moves both.
    Either way the process is in its group once `confined` settles, whether its waiter was
    started for it or was standing by."""
    hierarchy = Hierarchy.detect()
    if hierarchy is None:
        pytest.skip("needs cgroups with the cpu, memory and pids controllers")
    groups = VmCgroups(hierarchy, "vmm-test", f"born-{os.getpid()}")
    procs = groups.create("vm", Limits(vcpus=1, memory_bytes=256 * MIB, pids=64))
    exit_file = tmp_path / "exit"

    async def started_and_confined() -> tuple[int, bool]:
        process.stop_standby()
        if waiter == "standby":
            # Any process started under a waiter leaves one standing by.
            await process.start(["true"], tmp_path / "warm.log", exit_file=tmp_path / "warm")
            # Started in a thread, so waiting here blocks nothing it needs.
            wait_until(lambda: process._standby is not None, timeout=10,
                       what="a standby waiter")
        started = await process.start(["sleep", "30"], tmp_path / "console.log",
                                      exit_file=exit_file,
                                      confinement=Confinement(cgroup_procs=tuple(map(str, procs))))
        nothing_to_move = started.confined.done()
        await started.confined
        return started.ref.pid, nothing_to_move

    try:
        pid, nothing_to_move = asyncio.run(started_and_confined())
        try:
            assert {d.name for d in cgroup_dirs(pid).values()} == {"vm"}
            assert nothing_to_move == (hierarchy.version == 1)
            cmdline = psutil.Process(psutil.Process(pid).ppid()).cmdline()
            assert ("--standby" in cmdline) == (waiter == "standby")
            if waiter == "fresh":
                assert cmdline.count("--join") == (len(procs) if hierarchy.version == 1 else 0)
        finally:
            os.kill(pid, signal.SIGKILL)
            process.stop_standby()
        wait_until(lambda: exit_file.exists(), timeout=10, what="the waiter to record the exit")
        # The waiter leaves the group a moment after its record.
        wait_until(lambda: groups.remove("vm"), timeout=10, what="the group to empty")
    finally:
        for d in hierarchy.dirs(groups.base):
            with contextlib.suppress(OSError):
                d.rmdir()
        for d in hierarchy.dirs("vmm-test"):
            with contextlib.suppress(OSError):
                d.rmdir()

    exit_file.unlink()
    refused = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "agent" / "waiter.py"),
         "--join", str(tmp_path / "no-such-group" / "tasks"), str(exit_file), "true"],
        capture_output=True, text=True, timeout=30)
    assert refused.returncode == 126
    assert "cannot join the cgroup" in refused.stderr
    assert not exit_file.exists(), "nothing started, so no exit to record"
