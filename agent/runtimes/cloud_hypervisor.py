"""The Cloud Hypervisor backend: one `cloud-hypervisor` process per VM, driven over its API.

Each VM gets `cloud-hypervisor --api-socket path=<vm-dir>/api.sock --no-shutdown`;
the whole VmConfig, translated by agent.runtimes.cloud_hypervisor_config, goes in
one PUT vm.create, then vm.boot. `--no-shutdown` keeps the VMM when the guest
powers off, so a stopped VM boots again in the same process. Cloud Hypervisor
v53.0 drops the booted VM on a shutdown and reports its state as "Created"
again; the runtime records in runtime.json whether the VM has booted (`phase`)
and reads "Created" after a boot as SHUTDOWN.

The guest's serial port is in mode Tty: Cloud Hypervisor writes it to its
stdout, which the agent appends to console.log. (Mode File would truncate its
file at every boot and reboot, losing the console history.) Cloud Hypervisor's
own log goes to hypervisor.log.

When the config names a readiness marker (boot_options["ready_marker"]), boot
and reboot wait up to `boot_timeout` for it on the console (agent.runtimes.readiness).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from google.protobuf import json_format

from agent import process
from agent.hypervisors.clients import METRICS_TIMEOUT, ClientCache
from agent.hypervisors.cloud_hypervisor_api import (
    CloudHypervisorApi,
    CloudHypervisorApiError,
    DeviceJson,
    NetJson,
    VmConfigJson,
    VmInfo,
    VmState,
)
from agent.jail import Confinement
from agent.process import ProcessRef
from agent.runtimes.base import (
    Observation,
    Runtime,
    RuntimeFailure,
    RuntimeSettings,
    find_binary,
    hypervisor_log_tail,
    positive_int,
    rotate_log,
)
from agent.runtimes.cloud_hypervisor_config import (
    MIB,
    disk_to_attach,
    nic_to_attach,
    running_config,
    translate_config,
    vm_config_or_refuse,
)
from agent.runtimes.cloud_hypervisor_events import EventMonitor, event_file
from agent.runtimes.readiness import console_offset, ready_marker, wait_for_console_marker
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.features import feature
from vmm.v1 import host_pb2, vm_pb2

BINARY_NAME = "cloud-hypervisor"
SIMULATOR_NAME = "cloud-hypervisor-sim"
# Seconds between two looks at a VM that is stopping.
POLL_INTERVAL = 0.05
# Seconds the VMM gets to exit by itself after vmm.shutdown before it is killed.
EXIT_GRACE = 2.0

# vm.info's states as ours.
_VM_STATES = {
    VmState.CREATED.value: vm_pb2.VM_STATE_CREATED,
    VmState.RUNNING.value: vm_pb2.VM_STATE_RUNNING,
    VmState.PAUSED.value: vm_pb2.VM_STATE_PAUSED,
    VmState.SHUTDOWN.value: vm_pb2.VM_STATE_SHUTDOWN,
}

# The phases recorded in runtime.json.
PHASE_CREATED = "created"
PHASE_BOOTED = "booted"
PHASE_STOPPED = "stopped"


# ---- the support matrix ---------------------------------------------------------------


def cloud_hypervisor_capabilities(gdb: bool | None = None) -> host_pb2.BackendCapabilities:
    """The Cloud Hypervisor column of the backend support matrix. `gdb`: whether the
    installed binary takes --gdb (None: as declared for any build)."""
    full = host_pb2.SUPPORT_FULL
    gdb_feature = (feature("debug.gdb", full,
                           "needs a cloud-hypervisor built with the guest_debug feature")
                   if gdb is None or gdb else
                   feature("debug.gdb", host_pb2.SUPPORT_NONE,
                           "this cloud-hypervisor was built without the guest_debug feature "
                           "(its --help offers no --gdb)"))
    return host_pb2.BackendCapabilities(
        backend=features.CLOUD_HYPERVISOR,
        limits=host_pb2.BackendLimits(min_vcpus=1, max_vcpus=448, min_memory_bytes=512 * MIB,
                                      max_memory_bytes=0, max_disks=0, max_nics=0),
        features=[
            feature("vm.create", full, "all unified API fields, in one vm.create"),
            feature("vm.boot", full),
            feature("vm.shutdown", full,
                    "graceful: ACPI power button, then forced after the timeout"),
            feature("vm.pause_resume", full),
            feature("vm.reboot", full, "VMM-level reset (vm.reboot)"),
            feature("vm.delete", full, "resource cleanup"),
            feature("cpu.vcpu_count", full, "1-448 vCPUs"),
            feature("cpu.hotplug", full, "runtime vCPU scaling up to max_vcpu_count"),
            feature("cpu.max_vcpu_count", full, "honored: the hotplug ceiling"),
            feature("cpu.topology", full, "sockets, cores, threads"),
            feature("cpu.affinity", full,
                    'pin vCPUs to host CPUs: features["affinity"]; vm.create must fit Cloud '
                    "Hypervisor's 51,200-byte request limit (448 vCPUs pinned to 32 host CPUs "
                    "each do; larger pinnings are refused at create)"),
            feature("memory.size", full, "512 MiB - 1 TiB+"),
            feature("memory.hotplug", full,
                    "ACPI hot-add up to max_size_bytes in 128 MiB steps; no NUMA, no unplug"),
            feature("memory.hugepages", full, "2 MiB / 1 GiB"),
            feature("memory.numa", full, "guest NUMA nodes with their own memory zones"),
            feature("memory.sharing", full, "shared guest memory, as vhost-user needs"),
            feature("storage.block", full, "files + raw block devices"),
            feature("storage.read_only", full),
            feature("storage.multiple", full, "unlimited"),
            feature("storage.hotplug", full),
            feature("storage.advanced_io", full,
                    "io_uring/aio/sync, O_DIRECT, queues, rate limiting"),
            feature("network.tap", full, "multiple TAP interfaces"),
            feature("network.mac", full, "custom MAC addresses"),
            feature("network.vhost_user", full, 'options["vhost_socket"]'),
            feature("network.hotplug", full),
            feature("network.sriov", full, 'VFIO passthrough: options["vfio_path"]'),
            feature("console.serial", full),
            feature("console.logging", full, "file output"),
            feature("debug.rich", full, "counters, device tree, hypervisor log"),
            gdb_feature,
        ],
    )


# ---- binaries --------------------------------------------------------------------------


def simulator_path() -> str | None:
    """The project's Cloud Hypervisor API simulator, installed beside this Python."""
    found = shutil.which(SIMULATOR_NAME)
    if found:
        return found
    beside = Path(sys.executable).with_name(SIMULATOR_NAME)
    return str(beside) if beside.exists() else None


@functools.lru_cache(maxsize=8)
def offers_gdb(binary: str) -> bool:
    """Whether the binary takes --gdb: only builds with the guest_debug feature do, and a
    default release build refuses to start when given it. Read once from its --help."""
    try:
        done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--gdb" in done.stdout


@functools.lru_cache(maxsize=8)
def binary_version(binary: str) -> str:
    """"v53.0" from `cloud-hypervisor --version` ("cloud-hypervisor v53.0 ...")."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = done.stdout.split()
    return words[1] if len(words) > 1 else ""


# ---- the runtime -----------------------------------------------------------------------


class CloudHypervisorRuntime(Runtime):
    name = features.CLOUD_HYPERVISOR

    def nic_queue_pairs(self, nic: vm_pb2.NetworkInterface) -> int:
        # num_queues counts rx and tx queues apart (default 2: one pair).
        return max(1, (positive_int(nic.options.get("num_queues", "")) or 2) // 2)

    def __init__(self, binary: str, simulated: bool, settings: RuntimeSettings) -> None:
        super().__init__(binary, simulated, settings)
        # The last (monotonic time, CPU seconds) per VM, for cpu_usage_percent.
        self._cpu_samples: dict[Path, tuple[float, float]] = {}
        self._events = EventMonitor()
        # One keep-alive API client per VM for vm.counters.
        self._metrics_clients: ClientCache[CloudHypervisorApi] = ClientCache(
            functools.partial(CloudHypervisorApi, timeout=METRICS_TIMEOUT))
        self._landlock: bool | None = None  # does the binary have Landlock?

    @classmethod
    def detect(cls, settings: RuntimeSettings) -> CloudHypervisorRuntime | None:
        """The configured binary, else cloud-hypervisor on PATH, else the simulator.

        A configured binary that does not exist gives no runtime rather than the
        simulator: a host set up for the real hypervisor must not quietly fake it.
        """
        if not settings.force_simulator:
            if settings.binary:
                configured = find_binary(settings.binary, ())
                return cls(configured, False, settings) if configured else None
            found = find_binary(None, (BINARY_NAME,))
            if found:
                return cls(found, False, settings)
        simulator = simulator_path()
        return cls(simulator, True, settings) if simulator else None

    def capabilities(self) -> host_pb2.BackendCapabilities:
        return cloud_hypervisor_capabilities(
            gdb=offers_gdb(self.binary) if self.binary else None)

    def version(self) -> str:
        return binary_version(self.binary)

    def files_written(self, vm: VmDir) -> list[Path]:
        return [*super().files_written(vm), event_file(vm)]

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        _, violations = translate_config(config)
        return violations

    # ---- lifecycle

    def _sandboxed(self, vm_config: VmConfigJson) -> VmConfigJson:
        """Landlock on, where the binary has it: Cloud Hypervisor then reaches only the
        files of the config, and the host path roots for devices plugged in later."""
        if self._has_landlock():
            vm_config["landlock_enable"] = True
            vm_config["landlock_rules"] = [{"path": root, "access": "rw"}
                                           for root in self.settings.host_path_roots]
        return vm_config

    def _has_landlock(self) -> bool:
        if self._landlock is None:
            try:
                usage = subprocess.run([self.binary, "--help"], capture_output=True,
                                       text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                usage = ""
            self._landlock = "--landlock" in usage
        return self._landlock

    async def create(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        vm_config = self._sandboxed(vm_config_or_refuse(desired.config))
        vm.create()
        if self.live_process(vm) is None:
            ref = await self._start_vmm(vm, desired.config)
        else:
            ref = self._require_process(vm)
        try:
            async with self._api(vm) as api:
                if await self._state(api) is None:
                    await api.create_vm(vm_config)
        except RuntimeFailure:
            await self._stop_vmm(vm, ref)
            vm.clear_runtime()
            raise

    async def boot(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        if self.live_process(vm) is None:
            await self.create(vm, desired)
        ref = self._require_process(vm)
        async with self._api(vm) as api:
            info = await self._info(api)
            if info is None:
                await api.create_vm(self._sandboxed(vm_config_or_refuse(desired.config)))
            elif info.state == VmState.RUNNING:
                return
            elif info.state == VmState.PAUSED:
                await api.resume_vm()
                return
            elif info.built:
                await self._drop_failed_boot(api)
            offset = console_offset(vm)
            self._events.booting(vm)  # a panic of an earlier boot is over
            try:
                await api.boot_vm()
            except CloudHypervisorApiError:
                # So that the next attempt can boot once the cause is gone; the boot's
                # own error is the one to report.
                with contextlib.suppress(RuntimeFailure):
                    await self._drop_failed_boot(api)
                raise
        self._update_record(vm, phase=PHASE_BOOTED, booted_at=time.time())
        await self._await_ready(vm, ref, desired.config, offset)

    async def pause(self, vm: VmDir) -> None:
        self._require_process(vm)
        async with self._api(vm) as api:
            if await self._state(api) != VmState.PAUSED:
                await api.pause_vm()

    async def resume(self, vm: VmDir) -> None:
        self._require_process(vm)
        async with self._api(vm) as api:
            if await self._state(api) != VmState.RUNNING:
                await api.resume_vm()

    async def shutdown(self, vm: VmDir, force: bool, timeout: float) -> None:
        ref = self.live_process(vm)
        if ref is None:
            return
        async with self._api(vm) as api:
            if await self._guest_running(api) and not force:
                await self._press_power_button(api, ref, timeout)
            # A VM whose boot failed half way is built too, and stops the same way.
            if process.is_alive(ref) and await self._built(api):
                await api.shutdown_vm()
        if process.is_alive(ref):
            self._update_record(vm, phase=PHASE_STOPPED, booted_at=0)

    async def _press_power_button(self, api: CloudHypervisorApi, ref: ProcessRef,
                                  grace: float) -> None:
        """ACPI shutdown: the guest gets up to `grace` seconds to power itself off."""
        if await self._state(api) == VmState.PAUSED:
            await api.resume_vm()  # a paused guest cannot see the button
        await api.power_button()
        deadline = time.monotonic() + (grace if grace > 0
                                       else self.settings.default_shutdown_timeout)
        while time.monotonic() < deadline:
            # Without --no-shutdown (an older VMM) the process itself ends.
            if not process.is_alive(ref) or not await self._guest_running(api):
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def reboot(self, vm: VmDir, desired: agent_pb2.DesiredVm, force: bool) -> None:
        # Cloud Hypervisor has one reboot: the VMM resets the VM (no guest cooperation),
        # so `force` changes nothing.
        ref = self.live_process(vm)
        if ref is not None:
            async with self._api(vm) as api:
                running = await self._guest_running(api)
                offset = console_offset(vm)
                if running:
                    await api.reboot_vm()
            if running:
                self._update_record(vm, phase=PHASE_BOOTED, booted_at=time.time())
                await self._await_ready(vm, ref, desired.config, offset)
                return
        await self.boot(vm, desired)

    async def destroy(self, vm: VmDir) -> None:
        ref = self.load_process(vm)
        if ref is not None:
            await self._stop_vmm(vm, ref)
        vm.api_socket.unlink(missing_ok=True)
        vm.clear_runtime()
        self._cpu_samples.pop(vm.path, None)
        await self._metrics_clients.discard(vm.api_socket)

    async def _stop_vmm(self, vm: VmDir, ref: ProcessRef) -> None:
        """vm.delete and vmm.shutdown, then SIGKILL if the VMM is still there."""
        if process.is_alive(ref):
            try:
                async with CloudHypervisorApi(vm.api_socket, timeout=EXIT_GRACE) as api:
                    await api.delete_vm()
                    await api.shutdown_vmm()
            except RuntimeFailure:
                pass  # it is killed below
            if not await process.wait_exit(ref, EXIT_GRACE):
                await process.kill(ref)
        vm.api_socket.unlink(missing_ok=True)

    # ---- observation

    async def observe(self, vm: VmDir) -> Observation:
        ref = self.load_process(vm)
        if ref is None:
            return Observation(alive=False, detail="no cloud-hypervisor process is recorded")
        if not process.is_alive(ref):
            return Observation(alive=False, pid=ref.pid, detail=process.exit_detail(ref))
        info = {"api_socket": str(vm.api_socket), "simulated": str(self.simulated).lower()}
        try:
            async with self._api(vm) as api:
                vm_info = await api.vm_info()
        except CloudHypervisorApiError as e:
            detail = "the cloud-hypervisor process holds no VM" if e.vm_not_created else e.message
            return Observation(alive=True, pid=ref.pid, backend_info=info, detail=detail)
        except RuntimeFailure as e:
            return Observation(alive=True, pid=ref.pid, backend_info=info, detail=e.message)
        info["hypervisor_state"] = vm_info.state
        info["memory_actual_size"] = str(vm_info.memory_actual_size)
        state = _VM_STATES.get(vm_info.state, vm_pb2.VM_STATE_UNSPECIFIED)
        # v53.0 reports a VM that was booted and then stopped as "Created" again.
        if (state == vm_pb2.VM_STATE_CREATED
                and vm.load_runtime().get("phase", PHASE_CREATED) != PHASE_CREATED):
            state = vm_pb2.VM_STATE_SHUTDOWN
        return Observation(alive=True, pid=ref.pid, backend_info=info, state=state,
                           guest_panic=self._events.guest_panicked(vm))

    def guest_panic_reported(self, vm: VmDir) -> bool:
        return self._events.guest_panicked(vm)

    async def metrics(self, vm: VmDir) -> vm_pb2.VmMetrics:
        ref = self.live_process(vm)
        if ref is None:
            await self._metrics_clients.discard(vm.api_socket)
            return vm_pb2.VmMetrics()
        result = vm_pb2.VmMetrics(memory_usage_bytes=process.rss_bytes(ref),
                                  cpu_usage_percent=self._cpu_percent(vm, ref))
        api = await self._metrics_clients.get(vm.api_socket, ref.pid)
        try:
            counters = await api.vm_counters()
        except CloudHypervisorApiError:
            return result  # not booted: no devices to count
        except BaseException:
            await self._metrics_clients.discard(vm.api_socket)
            raise
        for device in counters.values():
            result.storage_stats.bytes_read += device.get("read_bytes", 0)
            result.storage_stats.bytes_written += device.get("write_bytes", 0)
            result.storage_stats.read_operations += device.get("read_ops", 0)
            result.storage_stats.write_operations += device.get("write_ops", 0)
            result.network_stats.bytes_received += device.get("rx_bytes", 0)
            result.network_stats.bytes_transmitted += device.get("tx_bytes", 0)
            result.network_stats.packets_received += device.get("rx_frames", 0)
            result.network_stats.packets_transmitted += device.get("tx_frames", 0)
        booted_at = float(vm.load_runtime().get("booted_at") or 0)
        if booted_at:
            result.uptime_seconds = max(0, int(time.time() - booted_at))
        return result

    def _cpu_percent(self, vm: VmDir, ref: ProcessRef) -> float:
        now, used = time.monotonic(), process.cpu_seconds(ref)
        previous = self._cpu_samples.get(vm.path)
        self._cpu_samples[vm.path] = (now, used)
        if previous is None:
            elapsed, spent = time.time() - ref.started_at, used
        else:
            elapsed, spent = now - previous[0], used - previous[1]
        return max(0.0, 100.0 * spent / elapsed) if elapsed > 0 else 0.0

    # ---- hotplug

    async def hotplug(self, vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
        self._require_process(vm)
        recorded = self._recorded_config(vm)
        change = request.WhichOneof("change")
        async with self._api(vm) as api:
            before = await api.vm_info()
            if change == "resize":
                await self._resize(vm, api, before, request.resize)
            elif change == "attach_disk":
                recorded.storage.append(request.attach_disk)
                await api.add_disk(disk_to_attach(recorded))
            elif change == "attach_nic":
                recorded.network.append(request.attach_nic)
                nic = nic_to_attach(recorded)
                if "path" in nic:
                    await api.add_device(cast(DeviceJson, nic))
                else:
                    await api.add_net(cast(NetJson, nic))
            elif change == "detach_disk":
                await self._detach(vm, api, before, request.detach_disk, ("disks",), "disk")
            elif change == "detach_nic":
                await self._detach(vm, api, before, request.detach_nic, ("net", "devices"),
                                   "network interface")
            else:
                raise RuntimeFailure("the hotplug request names no change", "INVALID_ARGUMENT")
            updated = running_config(recorded, await api.vm_info())
        self._update_record(vm, config=json_format.MessageToDict(updated))
        return updated

    @staticmethod
    async def _detach(vm: VmDir, api: CloudHypervisorApi, info: VmInfo, device_id: str,
                      kinds: tuple[str, ...], what: str) -> None:
        if device_id not in {d.get("id") for kind in kinds for d in info.devices(kind)}:
            raise RuntimeFailure(f"VM {vm.vm_id} has no {what} with id {device_id!r}",
                                 "NOT_FOUND")
        await api.remove_device(device_id)

    async def _resize(self, vm: VmDir, api: CloudHypervisorApi, info: VmInfo,
                      resize: vm_pb2.ResizeVmRequest) -> None:
        cpus, memory = info.config.get("cpus") or {}, info.config.get("memory") or {}
        vcpus = resize.vcpu_count or None
        if vcpus is not None and vcpus > int(cpus.get("max_vcpus", 0)):
            raise RuntimeFailure(
                f"vcpu_count {vcpus} exceeds the VM's max_vcpu_count "
                f"{cpus.get('max_vcpus')}: Cloud Hypervisor hot-adds vCPUs only up to "
                "config.cpu.max_vcpu_count, set when the VM is created", "INVALID_ARGUMENT")
        ram = resize.memory_size_bytes or None
        if ram is not None and ram != int(memory.get("size", 0)):
            self._check_memory_resize(vm, memory, ram)
        try:
            await api.resize(desired_vcpus=vcpus, desired_ram=ram)
        except CloudHypervisorApiError as e:
            if e.status != 429:
                raise
            # A vCPU removal stays pending until the guest ejects the vCPUs (ACPI CPU
            # hotplug); one that has no CPU hotplug never does.
            raise RuntimeFailure(
                f"VM {vm.vm_id} still has a vCPU removal pending: the guest has not ejected "
                "the vCPUs an earlier resize took away, and Cloud Hypervisor refuses every "
                "vCPU resize until it does (a guest without ACPI CPU hotplug never does; "
                "reboot it to apply the new count)", "FAILED_PRECONDITION") from e

    def _check_memory_resize(self, vm: VmDir, memory: dict[str, Any], ram: int) -> None:
        if memory.get("zones"):
            raise RuntimeFailure("memory hotplug is not available for a VM with NUMA nodes "
                                 "on cloud-hypervisor", "FAILED_PRECONDITION")
        maximum = int(vm.load_runtime().get("max_memory_bytes") or 0)
        if "hotplug_size" not in memory or not maximum:
            raise RuntimeFailure("memory hotplug needs config.memory.hotplug_enabled and a "
                                 "config.memory.max_size_bytes above size_bytes when the VM is "
                                 "created", "INVALID_ARGUMENT")
        if ram > maximum:
            raise RuntimeFailure(f"memory_size_bytes {ram} exceeds the VM's max_size_bytes "
                                 f"{maximum} (config.memory.max_size_bytes)", "INVALID_ARGUMENT")
        if ram < int(memory.get("size", 0)):
            raise RuntimeFailure("Cloud Hypervisor cannot take ACPI-hotplugged memory back from "
                                 "a running guest; memory_size_bytes may only grow",
                                 "INVALID_ARGUMENT")

    # ---- helpers

    def _api(self, vm: VmDir) -> CloudHypervisorApi:
        return CloudHypervisorApi(vm.api_socket)

    @staticmethod
    async def _info(api: CloudHypervisorApi) -> VmInfo | None:
        """vm.info, or None when the VMM holds no VM config."""
        try:
            return await api.vm_info()
        except CloudHypervisorApiError as e:
            if e.vm_not_created:
                return None
            raise

    async def _state(self, api: CloudHypervisorApi) -> str | None:
        """The VM's state, or None when the VMM holds no VM."""
        info = await self._info(api)
        return info.state if info is not None else None

    async def _built(self, api: CloudHypervisorApi) -> bool:
        info = await self._info(api)
        return info is not None and info.built

    async def _drop_failed_boot(self, api: CloudHypervisorApi) -> None:
        """A vm.boot that failed after Cloud Hypervisor built the VM (a disk lock held, the
        kernel unreadable) leaves it built and "Created", and every later vm.boot answers
        "VM is already created". vm.shutdown drops that VM and keeps its config."""
        info = await self._info(api)
        if info is not None and info.state == VmState.CREATED and info.built:
            await api.shutdown_vm()

    async def _guest_running(self, api: CloudHypervisorApi) -> bool:
        return await self._state(api) in (VmState.RUNNING, VmState.PAUSED)

    def _require_process(self, vm: VmDir) -> ProcessRef:
        ref = self.live_process(vm)
        if ref is None:
            raise RuntimeFailure(f"VM {vm.vm_id} has no running cloud-hypervisor process",
                                 "FAILED_PRECONDITION")
        return ref

    def _update_record(self, vm: VmDir, **changes: object) -> None:
        record = vm.load_runtime()
        record.update(changes)
        vm.save_runtime(record)

    def _recorded_config(self, vm: VmDir) -> vm_pb2.VmConfig:
        config = vm_pb2.VmConfig()
        recorded = vm.load_runtime().get("config")
        if isinstance(recorded, dict):
            json_format.ParseDict(recorded, config)
        return config

    async def _start_vmm(self, vm: VmDir, config: vm_pb2.VmConfig) -> ProcessRef:
        vm.api_socket.unlink(missing_ok=True)
        # Cloud Hypervisor truncates its log file at start: keep the previous process's
        # (a fresh file for the next, its uid's: it may not create files in the VM dir).
        rotate_log(vm.hypervisor_log)
        # -v: info level, where Cloud Hypervisor logs API errors and lifecycle events;
        # without it the log holds warnings only. The seccomp filter is on by default;
        # said here so that it stays on.
        argv = [self.binary, "--api-socket", f"path={vm.api_socket}", "--no-shutdown", "-v",
                "--seccomp", "true",
                "--log-file", str(vm.hypervisor_log),
                # Where its pvpanic device's reports arrive (see guest_panic_reported).
                "--event-monitor", f"path={event_file(vm)}"]
        self._events.forget(vm)
        gdb_socket = config.boot.boot_options.get(features.GDB_KEY)
        if gdb_socket:
            argv += ["--gdb", f"path={gdb_socket}"]
        # Its stdout is the guest's serial port (mode Tty); its log and stderr go apart.
        started = await process.start(argv, vm.console_log, cwd=vm.path,
                                      hypervisor_log=vm.hypervisor_log,
                                      exit_file=vm.exit_status_file,
                                      confinement=Confinement.load(vm))
        ref = started.ref
        max_memory = max(config.memory.max_size_bytes, config.memory.size_bytes)
        self.save_process(vm, ref, phase=PHASE_CREATED, booted_at=0,
                          max_memory_bytes=max_memory,
                          config=json_format.MessageToDict(config))
        try:
            await process.wait_for_socket(vm.api_socket, ref, self.settings.socket_timeout)
            await self._await_api(vm)
            # Started while being moved into its cgroup; there before it is given a VM.
            await started.confined
        except (RuntimeError, TimeoutError, RuntimeFailure, OSError) as e:
            await process.kill(ref)
            vm.api_socket.unlink(missing_ok=True)
            vm.clear_runtime()
            tail = hypervisor_log_tail(vm, lines=10)
            raise RuntimeFailure(f"cloud-hypervisor did not start: {e}"
                                 + (f"; its output: {tail}" if tail else ""),
                                 "UNAVAILABLE") from e
        return ref

    async def _await_api(self, vm: VmDir) -> None:
        """Until the freshly created socket answers vmm.ping."""
        deadline = time.monotonic() + self.settings.socket_timeout
        async with self._api(vm) as api:
            while True:
                try:
                    await api.ping()
                    return
                except RuntimeFailure:
                    if time.monotonic() >= deadline:
                        raise
                await asyncio.sleep(POLL_INTERVAL)

    async def _await_ready(self, vm: VmDir, ref: ProcessRef, config: vm_pb2.VmConfig,
                           since_offset: int) -> None:
        marker = ready_marker(config.boot.boot_options)
        if marker:
            await wait_for_console_marker(vm, marker, self.settings.boot_timeout, since_offset,
                                          alive=lambda: process.is_alive(ref))
