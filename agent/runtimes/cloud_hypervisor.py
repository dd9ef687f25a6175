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

What the backend supports and what the binary offers: cloud_hypervisor_capabilities;
changes to a running VM: cloud_hypervisor_hotplug.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from pathlib import Path

from google.protobuf import json_format

from agent import process
from agent.hypervisors.clients import METRICS_TIMEOUT, ClientCache
from agent.hypervisors.cloud_hypervisor_api import (
    CloudHypervisorApi,
    CloudHypervisorApiError,
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
from agent.runtimes.cloud_hypervisor_capabilities import (
    binary_version,
    cloud_hypervisor_capabilities,
    offers_gdb,
    offers_landlock,
    simulator_path,
)
from agent.runtimes.cloud_hypervisor_config import (
    translate_config,
    vm_config_or_refuse,
)
from agent.runtimes.cloud_hypervisor_events import EventMonitor, event_file
from agent.runtimes.cloud_hypervisor_hotplug import apply_hotplug
from agent.runtimes.readiness import console_offset, ready_marker, wait_for_console_marker
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

BINARY_NAME = "cloud-hypervisor"
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
        if offers_landlock(self.binary):
            vm_config["landlock_enable"] = True
            vm_config["landlock_rules"] = [{"path": root, "access": "rw"}
                                           for root in self.settings.host_path_roots]
        return vm_config

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
        async with self._api(vm) as api:
            updated = await apply_hotplug(vm, api, self._recorded_config(vm), request)
        self._update_record(vm, config=json_format.MessageToDict(updated))
        return updated

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
