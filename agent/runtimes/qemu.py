"""The QEMU runtime: one `qemu-system-x86_64` process per VM, driven over QMP.

The process starts paused (-S) with its QMP socket at the VM's API socket, so a
created VM exists before it runs; boot is `cont`. The serial console goes to the
VM's console.log. Pause and resume are `stop` / `cont`. A graceful shutdown
presses the ACPI power button (`system_powerdown`): a guest that handles it
powers off and QEMU exits by itself; after the timeout the runtime `quit`s.
Reboot is `system_reset`, a hard reset (QEMU has no way to ask a guest to
reboot), and a reboot the guest starts itself resets the machine in place, so
the process lives on across guest reboots.

Acceleration (see qemu_accel): KVM where the guest can run under it, TCG
otherwise; the choice is recorded and reported in backend_info["accel"]. The
machine (see qemu_launch) is microvm, or q35 when the VM needs hotplug, NUMA or
passthrough, or runs under TCG; reported in backend_info["machine"].

boot.boot_options this runtime reads: "ready_marker" (below), "machine"
("microvm" | "q35"), "accel" ("auto" | "kvm" | "tcg", overriding the runtime's
default for one VM) and "gdb_socket" (a gdbstub on that Unix socket).

Readiness: with boot.boot_options["ready_marker"] set, boot and reboot return
only once the guest printed that text on its console (up to the settings'
boot_timeout), and fail with the console's tail otherwise.

Runtime changes (hotplug) need the q35 machine (see qemu_launch): vCPUs are
added with device_add of free CPU slots, memory as pc-dimm devices, disks and
NICs on spare PCIe root ports. Removing anything needs the guest to release it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from google.protobuf import json_format

from agent import process
from agent.hypervisors.qmp import QmpClient
from agent.process import ProcessRef
from agent.runtimes.base import (
    Observation,
    Runtime,
    RuntimeFailure,
    RuntimeSettings,
    check_host_paths,
    console_tail,
    find_binary,
)
from agent.runtimes.qemu_accel import Accel, choose_accel, kvm_device_usable
from agent.runtimes.qemu_launch import (
    ACCEL_OPTION,
    HUGEPAGE_SIZES,
    MAX_DISKS,
    MAX_MEMORY_BYTES,
    MAX_NICS,
    MAX_VCPUS,
    MIB,
    MIN_MEMORY_BYTES,
    Machine,
    build_launch,
    config_violations,
    disk_blockdev,
    disk_device,
    disk_ids,
    disk_throttle_group,
    disk_violations,
    hugepage_size,
    memory_backend,
    nic_backend,
    nic_device,
    nic_ids,
    nic_violations,
    parse_cpu_list,
    qemu_id,
    requested_accel,
    root_port_id,
)
from agent.runtimes.readiness import console_offset, ready_marker, wait_for_console_marker
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)

BINARY_NAME = "qemu-system-x86_64"

# ---- the QEMU column of the backend support matrix -------------------------------------

_FULL = host_pb2.SUPPORT_FULL
_PARTIAL = host_pb2.SUPPORT_PARTIAL
_NONE = host_pb2.SUPPORT_NONE

SUPPORT_MATRIX: tuple[tuple[str, host_pb2.Support.ValueType, str], ...] = (
    # feature key            support    detail
    ("vm.create",            _FULL,     ""),
    ("vm.boot",              _FULL,     "KVM where the guest runs under it, else TCG emulation"),
    ("vm.shutdown",          _FULL,     "graceful: ACPI power button, then quit after the timeout"),
    ("vm.pause_resume",      _FULL,     ""),
    ("vm.reboot",            _PARTIAL,  "hard reset (system_reset): the guest is not asked first"),
    ("vm.delete",            _FULL,     ""),
    ("cpu.vcpu_count",       _FULL,     f"1-{MAX_VCPUS} vCPUs"),
    ("cpu.hotplug",          _PARTIAL,  "q35 machine (chosen when max_vcpu_count > vcpu_count); "
                                        "removal needs the guest to release the vCPU"),
    ("cpu.max_vcpu_count",   _FULL,     "-smp maxcpus"),
    ("cpu.topology",         _FULL,     "sockets, cores, threads"),
    ("cpu.affinity",         _PARTIAL,  "all vCPU threads pinned to one host CPU set"),
    ("memory.size",          _FULL,     "16 MiB - 1 TiB"),
    ("memory.hotplug",       _PARTIAL,  "q35 machine, up to max_size_bytes in DIMMs; removal "
                                        "only of hot-added DIMMs the guest releases"),
    ("memory.hugepages",     _FULL,     "2M/1G (memfd hugetlb; pages reserved on the host)"),
    ("memory.numa",          _FULL,     "q35 machine; vCPUs and memory split evenly"),
    ("memory.sharing",       _FULL,     "shared memfd backing"),
    ("storage.block",        _FULL,     "virtio-blk on files and raw block devices"),
    ("storage.read_only",    _FULL,     ""),
    ("storage.multiple",     _FULL,     f"up to {MAX_DISKS}"),
    ("storage.hotplug",      _PARTIAL,  "q35 machine (boot_options machine=q35)"),
    ("storage.advanced_io",  _FULL,     "cache modes, io_uring/native AIO, queues, rate limits"),
    ("network.tap",          _FULL,     f"up to {MAX_NICS}"),
    ("network.mac",          _FULL,     ""),
    ("network.vhost_user",   _FULL,     "options[socket]; guest memory is shared"),
    ("network.hotplug",      _PARTIAL,  "q35 machine (boot_options machine=q35)"),
    ("network.sriov",        _PARTIAL,  "VFIO passthrough of options[pci_address]; q35 machine"),
    ("console.serial",       _FULL,     ""),
    ("console.logging",      _FULL,     "file output"),
    ("debug.rich",           _FULL,     "QMP introspection"),
    ("debug.gdb",            _FULL,     "gdbstub on boot_options[gdb_socket]"),
)  # fmt: skip

LIMITS = host_pb2.BackendLimits(
    min_vcpus=1, max_vcpus=MAX_VCPUS,
    min_memory_bytes=MIN_MEMORY_BYTES, max_memory_bytes=MAX_MEMORY_BYTES,
    max_disks=MAX_DISKS, max_nics=MAX_NICS,
)

# QMP query-status `status` -> VmState. Statuses not listed count as PAUSED: QEMU is
# alive but the guest does not run (migration, snapshot, a debugger stop).
_VM_STATES: dict[str, vm_pb2.VmState.ValueType] = {
    "prelaunch": vm_pb2.VM_STATE_CREATED,
    "running": vm_pb2.VM_STATE_RUNNING,
    "paused": vm_pb2.VM_STATE_PAUSED,
    "suspended": vm_pb2.VM_STATE_PAUSED,
    "shutdown": vm_pb2.VM_STATE_SHUTDOWN,
    "internal-error": vm_pb2.VM_STATE_FAILED,
    "io-error": vm_pb2.VM_STATE_FAILED,
    "guest-panicked": vm_pb2.VM_STATE_FAILED,
    "watchdog": vm_pb2.VM_STATE_FAILED,
}

# runtime.json keys beside the process reference.
_ACCEL = "accel"
_ACCEL_REASON = "accel_reason"
_MACHINE = "machine"
_PORTS = "pcie_ports"  # QEMU device id -> root port
_PORT_COUNT = "pcie_port_count"
_CONFIG = "config"  # the VmConfig as it runs, after hotplug changes
_BOOTED_AT = "booted_at"
_STOPPED_AT = "stopped_at"

# Seconds QEMU gets to exit after `quit` before it is killed.
_QUIT_GRACE = 3.0
# Seconds a guest gets to release a device asked to be removed.
_UNPLUG_TIMEOUT = 10.0


@dataclass
class _CpuSample:
    pid: int
    at: float
    vcpu_seconds: float


class QemuRuntime(Runtime):
    name = features.QEMU

    def __init__(self, binary: str, simulated: bool = False,
                 settings: RuntimeSettings | None = None, accel: Accel = Accel.AUTO) -> None:
        super().__init__(binary, simulated, settings or RuntimeSettings())
        # The default accelerator; boot_options["accel"] overrides it per VM.
        self.accel = accel
        self._version: str | None = None
        self._cpu_samples: dict[Path, _CpuSample] = {}

    # ---- discovery and declarations -------------------------------------------------

    @classmethod
    def detect(cls, settings: RuntimeSettings) -> QemuRuntime | None:
        """The configured binary, else qemu-system-x86_64 on PATH; there is no simulator."""
        binary = find_binary(settings.binary, () if settings.binary else (BINARY_NAME,))
        if binary is None:
            if settings.binary:
                log.warning("qemu binary not found: configured=%s", settings.binary)
            return None
        # RuntimeSettings has no accelerator field of its own yet; honour one if present.
        accel = str(getattr(settings, "accel", "") or Accel.AUTO)
        return cls(binary, simulated=False, settings=settings, accel=Accel(accel))

    def version(self) -> str:
        if self._version is None:
            self._version = self._binary_version()
        return self._version

    def _binary_version(self) -> str:
        # "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
        try:
            done = subprocess.run([self.binary, "--version"], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("qemu --version failed: %s", e)
            return ""
        match = re.search(r"version (\S+)", done.stdout)
        return match[1] if match else ""

    def capabilities(self) -> host_pb2.BackendCapabilities:
        return host_pb2.BackendCapabilities(
            backend=self.name, limits=LIMITS,
            features=[features.feature(key, support, detail)
                      for key, support, detail in SUPPORT_MATRIX])

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        violations = check_host_paths(config) + config_violations(config)
        if not any(v.field.startswith("config.boot.boot_options") for v in violations):
            if requested_accel(config, self.accel) == Accel.KVM and not kvm_device_usable():
                violations.append(agent_pb2.FieldViolation(
                    field=f"config.boot.boot_options[{ACCEL_OPTION}]",
                    description="kvm was asked for but /dev/kvm is missing or not usable here"))
        violations += _hugepage_violations(config)
        return violations

    # ---- lifecycle ------------------------------------------------------------------

    async def create(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        await self._start_process(vm, desired.config)

    async def boot(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        ref = self.live_process(vm)
        if ref is not None and await self._guest_is_dead(vm):
            # A failed guest (internal error, panic) is not resumable: start afresh.
            await self._quit(vm, ref)
            ref = None
        if ref is None:
            ref = await self._start_process(vm, desired.config)
        async with self._qmp(vm) as qmp:
            status = await _status(qmp)
            if status == "running":
                return
            if status != "prelaunch":
                raise RuntimeFailure(f"VM {vm.vm_id} cannot boot: QEMU reports {status!r}"
                                     + (" (resume it rather than boot it)"
                                        if status == "paused" else ""))
            since = console_offset(vm)
            await qmp.execute("cont")
        self._update(vm, **{_BOOTED_AT: time.time()})
        await self._wait_ready(vm, desired.config, ref, since)

    async def pause(self, vm: VmDir) -> None:
        self._require_process(vm)
        async with self._qmp(vm) as qmp:
            status = await _status(qmp)
            if status == "paused":
                return
            if status != "running":
                raise RuntimeFailure(f"VM {vm.vm_id} is not running (QEMU reports {status!r})")
            await qmp.execute("stop")

    async def resume(self, vm: VmDir) -> None:
        self._require_process(vm)
        async with self._qmp(vm) as qmp:
            status = await _status(qmp)
            if status == "running":
                return
            if status != "paused":
                raise RuntimeFailure(f"VM {vm.vm_id} is not paused (QEMU reports {status!r})")
            await qmp.execute("cont")

    # The Runtime interface names the parameter `timeout`.
    async def shutdown(self, vm: VmDir, force: bool, timeout: float) -> None:
        ref = self.live_process(vm)
        if ref is not None:
            if not force:
                await self._power_button(vm, ref, timeout)
            await self._quit(vm, ref)
            # Keep the reference so observe() can tell this stop from a crash.
            self._update(vm, **{_STOPPED_AT: time.time()})
        vm.api_socket.unlink(missing_ok=True)
        self._cpu_samples.pop(vm.path, None)

    async def reboot(self, vm: VmDir, desired: agent_pb2.DesiredVm, force: bool) -> None:
        """system_reset whether or not `force` is set: QEMU cannot ask a guest to reboot."""
        ref = self.live_process(vm)
        if ref is None:
            await self.boot(vm, desired)
            return
        async with self._qmp(vm) as qmp:
            status = await _status(qmp)
            if status == "prelaunch":
                ref = None  # never booted: a plain boot follows
            else:
                since = console_offset(vm)
                await qmp.execute("system_reset")
                if status != "running":
                    await qmp.execute("cont")
        if ref is None:
            await self.boot(vm, desired)
            return
        self._update(vm, **{_BOOTED_AT: time.time()})
        await self._wait_ready(vm, desired.config, ref, since)

    async def destroy(self, vm: VmDir) -> None:
        await super().destroy(vm)
        self._cpu_samples.pop(vm.path, None)

    async def observe(self, vm: VmDir) -> Observation:
        data = vm.load_runtime()
        ref = ProcessRef.from_dict(data)
        info = {"api_socket": str(vm.api_socket), "simulated": "false"}
        for key in (_ACCEL, _ACCEL_REASON, _MACHINE):
            if key in data:
                info[key] = str(data[key])
        if ref is None:
            return Observation(alive=False, detail="no qemu process recorded", backend_info=info)
        info["pid"] = str(ref.pid)
        if not process.is_alive(ref):
            detail = process.exit_detail(ref)
            if _STOPPED_AT in data:
                return Observation(alive=False, pid=ref.pid, clean_exit=True,
                                   detail=f"stopped by the agent ({detail})", backend_info=info)
            # QEMU exits with status 0 when its guest powers off.
            return Observation(alive=False, pid=ref.pid, detail=detail,
                               clean_exit=process.exit_status(ref) == 0,
                               backend_info=info)
        try:
            async with QmpClient(vm.api_socket, timeout=2.0) as qmp:
                status = await _status(qmp)
                info["qemu_version"] = qmp.version
        except RuntimeFailure as e:
            return Observation(alive=True, pid=ref.pid, detail=e.message, backend_info=info)
        info["qmp_status"] = status
        state = _VM_STATES.get(status, vm_pb2.VM_STATE_PAUSED)
        detail = "" if status in {"prelaunch", "running", "paused"} else f"QEMU reports {status!r}"
        return Observation(alive=True, state=state, pid=ref.pid, detail=detail, backend_info=info)

    async def metrics(self, vm: VmDir) -> vm_pb2.VmMetrics:
        data = vm.load_runtime()
        ref = ProcessRef.from_dict(data)
        if ref is None or not process.is_alive(ref):
            return vm_pb2.VmMetrics()
        async with self._qmp(vm) as qmp:
            blockstats = await qmp.execute("query-blockstats") or []
            vcpu_threads = [c["thread-id"] for c in await qmp.execute("query-cpus-fast") or []]
        now, vcpu_seconds = time.time(), _threads_cpu_seconds(ref.pid, vcpu_threads)
        sample = self._cpu_samples.get(vm.path)
        if sample is None or sample.pid != ref.pid:
            # No earlier reading of this process: average since it started.
            sample = _CpuSample(ref.pid, ref.started_at, 0.0)
        elapsed = now - sample.at
        cpu_percent = (max(0.0, (vcpu_seconds - sample.vcpu_seconds) / elapsed * 100)
                       if elapsed > 0 else 0.0)
        self._cpu_samples[vm.path] = _CpuSample(ref.pid, now, vcpu_seconds)
        booted_at = data.get(_BOOTED_AT)
        return vm_pb2.VmMetrics(
            cpu_usage_percent=cpu_percent,
            memory_usage_bytes=process.rss_bytes(ref),
            storage_stats=_storage_stats(blockstats),
            network_stats=_tap_stats(self._running_config(vm)),
            uptime_seconds=int(now - booted_at) if isinstance(booted_at, int | float) else 0,
        )

    # ---- hotplug --------------------------------------------------------------------

    async def hotplug(self, vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
        change = request.WhichOneof("change")
        self._require_process(vm)
        data = vm.load_runtime()
        config = self._running_config(vm)
        if data.get(_MACHINE) != Machine.Q35:
            key = _hotplug_feature(request)
            raise RuntimeFailure(
                f"{features.FEATURES_BY_KEY[key].title} on qemu needs the q35 machine; VM "
                f"{vm.vm_id} runs on {data.get(_MACHINE, 'an unknown machine')} (create it with "
                "boot_options machine=q35, or with max_vcpu_count/max_size_bytes above its "
                "size)")
        async with self._qmp(vm, timeout=_UNPLUG_TIMEOUT + 5) as qmp:
            if change == "resize":
                await self._resize(vm, qmp, config, request.resize)
            elif change == "attach_disk":
                await self._attach_disk(vm, qmp, config, request.attach_disk)
            elif change == "detach_disk":
                await self._detach_disk(vm, qmp, config, request.detach_disk)
            elif change == "attach_nic":
                await self._attach_nic(vm, qmp, config, request.attach_nic)
            elif change == "detach_nic":
                await self._detach_nic(vm, qmp, config, request.detach_nic)
            else:
                raise RuntimeFailure("the hotplug request names no change", "INVALID_ARGUMENT")
        self._update(vm, **{_CONFIG: json_format.MessageToDict(config)})
        return config

    async def _resize(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                      resize: vm_pb2.ResizeVmRequest) -> None:
        if resize.vcpu_count and resize.vcpu_count != config.cpu.vcpu_count:
            await self._resize_vcpus(vm, qmp, config, resize.vcpu_count)
        if resize.memory_size_bytes and resize.memory_size_bytes != config.memory.size_bytes:
            await self._resize_memory(qmp, config, resize.memory_size_bytes)

    async def _resize_vcpus(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                            wanted: int) -> None:
        slots = await qmp.execute("query-hotpluggable-cpus") or []
        ceiling = len(slots)
        if not 1 <= wanted <= ceiling:
            raise RuntimeFailure(f"vcpu_count {wanted} is outside 1-{ceiling} (max_vcpu_count)",
                                 "INVALID_ARGUMENT")
        plugged = [s for s in slots if s.get("qom-path")]
        if wanted > len(plugged):
            free = [s for s in slots if not s.get("qom-path")]
            # QEMU lists slots from the highest id down; plug the lowest first.
            free.sort(key=lambda s: tuple(sorted(s.get("props", {}).items())))
            for slot in free[:wanted - len(plugged)]:
                props = slot.get("props", {})
                await qmp.execute("device_add", {
                    "driver": slot["type"], "id": _vcpu_device_id(props), **props})
            await self._pin_vcpus(vm, qmp, config)
        elif wanted < len(plugged):
            ours = sorted((s for s in plugged if "/peripheral/" in s["qom-path"]),
                          key=lambda s: s["qom-path"], reverse=True)
            excess = len(plugged) - wanted
            if len(ours) < excess:
                raise RuntimeFailure(
                    f"only vCPUs added at runtime can be removed: VM {vm.vm_id} booted with "
                    f"{len(plugged) - len(ours)}")
            for slot in ours[:excess]:
                await _unplug(qmp, slot["qom-path"].rsplit("/", 1)[-1])
        config.cpu.vcpu_count = wanted

    async def _resize_memory(self, qmp: QmpClient, config: vm_pb2.VmConfig,
                             wanted: int) -> None:
        if wanted % MIB:
            raise RuntimeFailure(f"memory_size_bytes {wanted} is not a whole number of MiB",
                                 "INVALID_ARGUMENT")
        ceiling = max(config.memory.max_size_bytes, config.memory.size_bytes)
        if wanted > ceiling:
            raise RuntimeFailure(f"memory_size_bytes {wanted} is above max_size_bytes "
                                 f"{ceiling}", "INVALID_ARGUMENT")
        dimms = [d["data"] for d in await qmp.execute("query-memory-devices") or []
                 if d.get("type") == "dimm"]
        current = config.memory.size_bytes
        if wanted > current:
            page = hugepage_size(config) or 2 * MIB
            if (wanted - current) % page:
                raise RuntimeFailure(f"memory can grow only in multiples of {page // MIB} MiB",
                                     "INVALID_ARGUMENT")
            index = len(dimms)
            while any(d.get("id") == f"dimm{index}" for d in dimms):
                index += 1
            backend = memory_backend(f"mem-dimm{index}", wanted - current, config)
            await qmp.execute("object-add", backend)
            await qmp.execute("device_add", {"driver": "pc-dimm", "id": f"dimm{index}",
                                             "memdev": backend["id"]})
        else:
            # Remove the most recent DIMMs that together make up the difference exactly.
            remaining, chosen = current - wanted, []
            for dimm in sorted(dimms, key=lambda d: d.get("addr", 0), reverse=True):
                if remaining <= 0:
                    break
                chosen.append(dimm)
                remaining -= int(dimm.get("size", 0))
            if remaining != 0:
                raise RuntimeFailure(
                    "qemu can only remove whole hot-added DIMMs: no set of the most recent "
                    f"ones adds up to the {current - wanted} bytes asked for")
            for dimm in chosen:
                await _unplug(qmp, str(dimm["id"]))
                await qmp.execute("object-del", {"id": str(dimm["memdev"]).rsplit("/", 1)[-1]})
        config.memory.size_bytes = wanted

    async def _attach_disk(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                           disk: vm_pb2.StorageDevice) -> None:
        disk_id = disk.id or f"disk{len(config.storage)}"
        if disk_id in disk_ids(config.storage):
            raise RuntimeFailure(f"VM {vm.vm_id} already has a disk {disk_id!r}",
                                 "ALREADY_EXISTS")
        _raise_violations(disk_violations(disk, "device") + check_host_paths(
            vm_pb2.VmConfig(storage=[disk])))
        if len(config.storage) >= MAX_DISKS:
            raise RuntimeFailure(f"VM {vm.vm_id} already has {MAX_DISKS} disks",
                                 "RESOURCE_EXHAUSTED")
        device_qemu_id = qemu_id("disk", disk_id)
        port = self._claim_port(vm, device_qemu_id)
        added: list[tuple[str, dict[str, Any]]] = []
        try:
            if group := disk_throttle_group(disk, disk_id):
                await qmp.execute("object-add", group)
                added.append(("object-del", {"id": group["id"]}))
            await qmp.execute("blockdev-add", disk_blockdev(disk, disk_id))
            added.append(("blockdev-del", {"node-name": device_qemu_id}))
            await qmp.execute("device_add", disk_device(disk, disk_id, Machine.Q35, port))
        except BaseException:
            await _undo(qmp, added)
            self._release_port(vm, device_qemu_id)
            raise
        stored = config.storage.add()
        stored.CopyFrom(disk)
        stored.id = disk_id

    async def _detach_disk(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                           disk_id: str) -> None:
        ids = disk_ids(config.storage)
        if disk_id not in ids:
            raise RuntimeFailure(f"VM {vm.vm_id} has no disk {disk_id!r}", "NOT_FOUND")
        index = ids.index(disk_id)
        disk = config.storage[index]
        await _unplug(qmp, qemu_id("disk", disk_id))
        await qmp.execute("blockdev-del", {"node-name": qemu_id("disk", disk_id)})
        if disk_throttle_group(disk, disk_id):
            await qmp.execute("object-del", {"id": qemu_id("throttle", disk_id)})
        self._release_port(vm, qemu_id("disk", disk_id))
        del config.storage[index]

    async def _attach_nic(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                          nic: vm_pb2.NetworkInterface) -> None:
        nic_id = nic.id or f"eth{len(config.network)}"
        if nic_id in nic_ids(config.network):
            raise RuntimeFailure(f"VM {vm.vm_id} already has a NIC {nic_id!r}", "ALREADY_EXISTS")
        _raise_violations(nic_violations(nic, "interface"))
        if len(config.network) >= MAX_NICS:
            raise RuntimeFailure(f"VM {vm.vm_id} already has {MAX_NICS} NICs",
                                 "RESOURCE_EXHAUSTED")
        device_qemu_id = qemu_id("nic", nic_id)
        port = self._claim_port(vm, device_qemu_id)
        chardev, netdev = nic_backend(nic, nic_id)
        added: list[tuple[str, dict[str, Any]]] = []
        try:
            if chardev:
                await qmp.execute("chardev-add", chardev)
                added.append(("chardev-remove", {"id": chardev["id"]}))
            if netdev:
                await qmp.execute("netdev_add", netdev)
                added.append(("netdev_del", {"id": netdev["id"]}))
            await qmp.execute("device_add", nic_device(nic, nic_id, Machine.Q35, port))
        except BaseException:
            await _undo(qmp, added)
            self._release_port(vm, device_qemu_id)
            raise
        stored = config.network.add()
        stored.CopyFrom(nic)
        stored.id = nic_id

    async def _detach_nic(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig,
                          nic_id: str) -> None:
        ids = nic_ids(config.network)
        if nic_id not in ids:
            raise RuntimeFailure(f"VM {vm.vm_id} has no NIC {nic_id!r}", "NOT_FOUND")
        index = ids.index(nic_id)
        chardev, netdev = nic_backend(config.network[index], nic_id)
        await _unplug(qmp, qemu_id("nic", nic_id))
        if netdev:
            await qmp.execute("netdev_del", {"id": netdev["id"]})
        if chardev:
            await qmp.execute("chardev-remove", {"id": chardev["id"]})
        self._release_port(vm, qemu_id("nic", nic_id))
        del config.network[index]

    def _claim_port(self, vm: VmDir, device_qemu_id: str) -> str:
        data = vm.load_runtime()
        ports: dict[str, str] = dict(data.get(_PORTS, {}))
        used = set(ports.values())
        for i in range(int(data.get(_PORT_COUNT, 0))):
            if root_port_id(i) not in used:
                ports[device_qemu_id] = root_port_id(i)
                self._update(vm, **{_PORTS: ports})
                return root_port_id(i)
        raise RuntimeFailure(f"VM {vm.vm_id} has no free PCIe port left for hotplug",
                             "RESOURCE_EXHAUSTED")

    def _release_port(self, vm: VmDir, device_qemu_id: str) -> None:
        ports = dict(vm.load_runtime().get(_PORTS, {}))
        if ports.pop(device_qemu_id, None) is not None:
            self._update(vm, **{_PORTS: ports})

    # ---- process and QMP plumbing ---------------------------------------------------

    def _qmp(self, vm: VmDir, timeout: float = 5.0) -> QmpClient:
        return QmpClient(vm.api_socket, timeout=timeout)

    def _update(self, vm: VmDir, **changes: object) -> None:
        vm.save_runtime({**vm.load_runtime(), **changes})

    def _require_process(self, vm: VmDir) -> ProcessRef:
        ref = self.live_process(vm)
        if ref is None:
            raise RuntimeFailure(f"the qemu process of VM {vm.vm_id} is not running")
        return ref

    def _running_config(self, vm: VmDir) -> vm_pb2.VmConfig:
        stored = vm.load_runtime().get(_CONFIG)
        config = vm_pb2.VmConfig()
        if isinstance(stored, dict):
            json_format.ParseDict(stored, config)
        return config

    async def _start_process(self, vm: VmDir, config: vm_pb2.VmConfig) -> ProcessRef:
        """A fresh QEMU process for vm, paused before the guest's first instruction."""
        _raise_violations(config_violations(config))  # before anything changes on the host
        try:
            accel = await choose_accel(self.binary, requested_accel(config, self.accel),
                                       Path(config.boot.kernel_path))
        except RuntimeError as e:
            raise RuntimeFailure(f"VM {vm.vm_id}: {e}") from e
        leftover = self.load_process(vm)
        if leftover is not None:  # e.g. from a create that was interrupted
            await process.kill(leftover)
        vm.create()
        # QEMU binds a fresh socket; a stale file would make it fail.
        vm.api_socket.unlink(missing_ok=True)
        launch = build_launch(self.binary, vm, config, accel)
        ref = process.spawn(launch.argv, vm.console_log, cwd=vm.path)
        self.save_process(vm, ref, api_socket=str(vm.api_socket),
                          **{_ACCEL: accel.accel.value, _ACCEL_REASON: accel.reason,
                             _MACHINE: launch.machine.value, _PORTS: launch.ports,
                             _PORT_COUNT: launch.port_count,
                             _CONFIG: json_format.MessageToDict(config)})
        self._cpu_samples.pop(vm.path, None)
        try:
            await self._wait_for_qmp(vm, ref)
            async with self._qmp(vm) as qmp:
                await self._pin_vcpus(vm, qmp, config)
        except (RuntimeError, TimeoutError, RuntimeFailure, asyncio.CancelledError) as e:
            # A half-started process is of no use: leave nothing behind.
            await process.kill(ref)
            vm.api_socket.unlink(missing_ok=True)
            vm.clear_runtime()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise RuntimeFailure(f"qemu did not start for VM {vm.vm_id}: {e}"
                                 f"{_console_excerpt(vm)}", "UNAVAILABLE") from e
        log.info("qemu_started vm_id=%s pid=%d accel=%s machine=%s", vm.vm_id, ref.pid,
                 accel.accel.value, launch.machine.value)
        return ref

    async def _wait_for_qmp(self, vm: VmDir, ref: ProcessRef) -> None:
        """Wait until QEMU answers on its QMP socket (the file appears before it listens)."""
        deadline = time.monotonic() + self.settings.socket_timeout
        await process.wait_for_socket(vm.api_socket, ref, self.settings.socket_timeout)
        while True:
            try:
                async with self._qmp(vm, timeout=max(0.1, deadline - time.monotonic())):
                    return
            except RuntimeFailure:
                if time.monotonic() > deadline or not process.is_alive(ref):
                    raise
            await asyncio.sleep(0.005)

    async def _pin_vcpus(self, vm: VmDir, qmp: QmpClient, config: vm_pb2.VmConfig) -> None:
        cpus = parse_cpu_list(config.cpu.features.get(features.CPU_AFFINITY_KEY, ""))
        if not cpus:
            return
        for vcpu in await qmp.execute("query-cpus-fast") or []:
            try:
                os.sched_setaffinity(int(vcpu["thread-id"]), cpus)
            except OSError as e:
                raise RuntimeFailure(f"VM {vm.vm_id}: cannot pin vCPU {vcpu.get('cpu-index')} "
                                     f"to host CPUs {sorted(cpus)}: {e}") from e

    async def _wait_ready(self, vm: VmDir, config: vm_pb2.VmConfig, ref: ProcessRef,
                          since: int) -> None:
        marker = ready_marker(config.boot.boot_options)
        if marker:
            await wait_for_console_marker(vm, marker, self.settings.boot_timeout, since,
                                          alive=_liveness(ref))

    async def _guest_is_dead(self, vm: VmDir) -> bool:
        async with self._qmp(vm) as qmp:
            status = await _status(qmp)
        return _VM_STATES.get(status) in {vm_pb2.VM_STATE_FAILED, vm_pb2.VM_STATE_SHUTDOWN}

    async def _power_button(self, vm: VmDir, ref: ProcessRef, wait_seconds: float) -> None:
        """Press the ACPI power button; wait up to wait_seconds for QEMU to exit with it."""
        try:
            async with self._qmp(vm) as qmp:
                status = await _status(qmp)
                if status == "prelaunch":
                    return  # no guest to ask
                if status != "running":
                    await qmp.execute("cont")  # a paused guest would never see the button
                await qmp.execute("system_powerdown")
        except RuntimeFailure as e:
            log.warning("powerdown_failed vm_id=%s error=%s", vm.vm_id, e.message)
            return
        if not await process.wait_exit(ref, wait_seconds):
            log.info("powerdown_unanswered vm_id=%s waited_s=%s", vm.vm_id, wait_seconds)

    async def _quit(self, vm: VmDir, ref: ProcessRef) -> None:
        """Stop QEMU at once: `quit`, then a kill if it does not exit."""
        if not process.is_alive(ref):
            return
        try:
            async with self._qmp(vm, timeout=2.0) as qmp:
                await qmp.quit()
        except RuntimeFailure as e:
            log.warning("qmp_quit_failed vm_id=%s error=%s", vm.vm_id, e.message)
        if not await process.wait_exit(ref, _QUIT_GRACE):
            await process.kill(ref)


# ---- helpers ----------------------------------------------------------------------------


async def _status(qmp: QmpClient) -> str:
    return str((await qmp.execute("query-status") or {}).get("status", ""))


async def _unplug(qmp: QmpClient, device_id: str) -> None:
    """device_del, then wait for the guest to release the device (DEVICE_DELETED)."""
    await qmp.execute("device_del", {"id": device_id})
    deadline = time.monotonic() + _UNPLUG_TIMEOUT
    while time.monotonic() < deadline:
        try:
            event = await qmp.wait_event("DEVICE_DELETED", deadline - time.monotonic())
        except TimeoutError:
            break
        if event.data.get("device") == device_id:
            return
    raise RuntimeFailure(f"the guest did not release {device_id} within {_UNPLUG_TIMEOUT:g}s; "
                         "QEMU removes it once the guest does", "DEADLINE_EXCEEDED")


async def _undo(qmp: QmpClient, added: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Remove what a failed attach had added, most recent first."""
    for command, arguments in reversed(added):
        try:
            await qmp.execute(command, arguments)
        except RuntimeFailure as e:
            log.warning("hotplug_undo_failed command=%s error=%s", command, e.message)


def _vcpu_device_id(props: Mapping[str, Any]) -> str:
    return "vcpu-" + "-".join(f"{k.removesuffix('-id')}{v}" for k, v in sorted(props.items()))


def _hotplug_feature(request: agent_pb2.HotplugRequest) -> str:
    change = request.WhichOneof("change")
    if change == "resize":
        return "memory.hotplug" if not request.resize.vcpu_count else "cpu.hotplug"
    return "storage.hotplug" if change in {"attach_disk", "detach_disk"} else "network.hotplug"


def _raise_violations(violations: Sequence[agent_pb2.FieldViolation]) -> None:
    if violations:
        raise RuntimeFailure("; ".join(f"{v.field}: {v.description}" for v in violations),
                             "INVALID_ARGUMENT")


def _hugepage_violations(config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
    """Hugepage-backed memory needs that many free pages of the size on this host."""
    size = hugepage_size(config)
    if not size:
        return []
    pool = Path(f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB/free_hugepages")
    name = next(k for k, v in HUGEPAGE_SIZES.items() if v == size)
    field_path = f"config.memory.backing[{features.HUGEPAGES_KEY}]"
    try:
        free = int(pool.read_text())
    except (OSError, ValueError):
        return [agent_pb2.FieldViolation(field=field_path,
                                         description=f"this host has no {name} hugepage pool")]
    needed = config.memory.size_bytes // size
    if free < needed:
        return [agent_pb2.FieldViolation(
            field=field_path, description=f"the VM needs {needed} free {name} hugepages; "
                                          f"this host has {free}")]
    return []


def _threads_cpu_seconds(pid: int, thread_ids: Sequence[int]) -> float:
    """CPU time (user + system) of the given threads of pid."""
    wanted = set(thread_ids)
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return 0.0
    return float(sum(t.user_time + t.system_time for t in threads if t.id in wanted))


def _storage_stats(blockstats: Sequence[Mapping[str, Any]]) -> vm_pb2.StorageStats:
    total = vm_pb2.StorageStats()
    for device in blockstats:
        stats = device.get("stats", {})
        total.bytes_read += int(stats.get("rd_bytes", 0))
        total.bytes_written += int(stats.get("wr_bytes", 0))
        total.read_operations += int(stats.get("rd_operations", 0))
        total.write_operations += int(stats.get("wr_operations", 0))
    return total


def _tap_stats(config: vm_pb2.VmConfig) -> vm_pb2.NetworkStats:
    """Guest traffic as seen on the host's TAP devices (the guest receives what they send)."""
    total = vm_pb2.NetworkStats()
    for nic in config.network:
        if not nic.tap_device:
            continue
        stats = Path("/sys/class/net") / nic.tap_device / "statistics"
        total.bytes_received += _read_counter(stats / "tx_bytes")
        total.bytes_transmitted += _read_counter(stats / "rx_bytes")
        total.packets_received += _read_counter(stats / "tx_packets")
        total.packets_transmitted += _read_counter(stats / "rx_packets")
    return total


def _read_counter(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _liveness(ref: ProcessRef) -> Callable[[], bool]:
    return lambda: process.is_alive(ref)


def _console_excerpt(vm: VmDir) -> str:
    tail = console_tail(vm, lines=5)
    return f"; console: {tail}" if tail else ""

