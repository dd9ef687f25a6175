"""The QEMU runtime: one `qemu-system-x86_64` process per VM, driven over QMP.

The process starts paused (-S) with its QMP socket at the VM's API socket, so a
created VM exists before it runs; boot is `cont`. The serial console goes to the
VM's console.log. Pause and resume are `stop` / `cont`. A graceful shutdown
presses the ACPI power button (`system_powerdown`): a guest that handles it
powers off and QEMU exits by itself; after the timeout the runtime `quit`s.
Reboot is `system_reset`, a hard reset (QEMU has no way to ask a guest to
reboot), and a reboot the guest starts itself resets the machine in place, so
the process lives on across guest reboots.

Acceleration (see accel): KVM where the guest can run under it, TCG
otherwise; the choice is recorded and reported in backend_info["accel"]. The
machine (see config) is microvm, or q35 when the VM needs hotplug, NUMA or
passthrough, or runs under TCG; reported in backend_info["machine"].

boot.boot_options this runtime reads: "ready_marker" (below), "machine"
("microvm" | "q35"), "accel" ("auto" | "kvm" | "tcg", overriding the runtime's
default for one VM) and "gdb_socket" (a gdbstub on that Unix socket).

Readiness: with boot.boot_options["ready_marker"] set, boot and reboot return
only once the guest printed that text on its console (up to the settings'
boot_timeout), and fail with the console's tail otherwise.

Runtime changes (see hotplug) need the q35 machine. The support matrix, limits and
preflight checks are in capabilities, metrics in metrics, and what the runtime keeps in
a VM's runtime.json in record.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format

from agent import process
from agent.hypervisors.qmp import QmpClient
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
)
from agent.runtimes.qemu import events, record
from agent.runtimes.qemu.accel import Accel, choose_accel
from agent.runtimes.qemu.capabilities import LIMITS, SUPPORT_MATRIX, preflight_violations
from agent.runtimes.qemu.config import config_violations, raise_violations, requested_accel
from agent.runtimes.qemu.hotplug import apply_hotplug, pin_vcpus
from agent.runtimes.qemu.launch import build_launch
from agent.runtimes.qemu.metrics import QemuMetrics
from agent.runtimes.readiness import console_offset, ready_marker, wait_for_console_marker
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)

BINARY_NAME = "qemu-system-x86_64"

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

# Seconds QEMU gets to exit after `quit` before it is killed.
_QUIT_GRACE = 3.0


class QemuRuntime(Runtime):
    name = features.QEMU
    # QEMU has no bandwidth limit of its own for a NIC: the agent shapes its TAP.
    limits_nic_rate = False

    def nic_queue_pairs(self, nic: vm_pb2.NetworkInterface) -> int:
        return positive_int(nic.options.get("num_queues", "")) or 1

    def __init__(self, binary: str, simulated: bool = False,
                 settings: RuntimeSettings | None = None, accel: Accel = Accel.AUTO) -> None:
        super().__init__(binary, simulated, settings or RuntimeSettings())
        # The default accelerator; boot_options["accel"] overrides it per VM.
        self.accel = accel
        self._version: str | None = None
        self._metrics = QemuMetrics()
        self._events = events.EventLog()

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

    def files_written(self, vm: VmDir) -> list[Path]:
        # The chardev of the console, and the pipe chardev of the QMP event monitor.
        return [*super().files_written(vm), *events.files(vm)]

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        return preflight_violations(config, self.accel)

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
        record.update(vm, **{record.BOOTED_AT: time.time()})
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
            record.update(vm, **{record.STOPPED_AT: time.time()})
        vm.api_socket.unlink(missing_ok=True)
        self._metrics.forget(vm)

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
        record.update(vm, **{record.BOOTED_AT: time.time()})
        await self._wait_ready(vm, desired.config, ref, since)

    async def destroy(self, vm: VmDir) -> None:
        await super().destroy(vm)
        self._metrics.forget(vm)
        self._events.forget(vm)

    async def observe(self, vm: VmDir) -> Observation:
        data = vm.load_runtime()
        ref = ProcessRef.from_dict(data)
        info = {"api_socket": str(vm.api_socket), "simulated": "false"}
        for key in (record.ACCEL, record.ACCEL_REASON, record.MACHINE):
            if key in data:
                info[key] = str(data[key])
        if ref is None:
            return Observation(alive=False, detail="no qemu process recorded", backend_info=info)
        info["pid"] = str(ref.pid)
        if not process.is_alive(ref):
            detail = process.exit_detail(ref)
            if record.STOPPED_AT in data:
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
        return Observation(alive=True, state=state, pid=ref.pid, detail=detail, backend_info=info,
                           guest_panic=status == "guest-panicked")

    def guest_panic_reported(self, vm: VmDir) -> bool:
        return self._events.guest_panicked(vm)

    async def metrics(self, vm: VmDir) -> vm_pb2.VmMetrics:
        return await self._metrics.read(vm)

    # ---- hotplug --------------------------------------------------------------------

    async def hotplug(self, vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
        self._require_process(vm)
        return await apply_hotplug(vm, request)

    # ---- process and QMP plumbing ---------------------------------------------------

    def _qmp(self, vm: VmDir, timeout: float = 5.0) -> QmpClient:
        return QmpClient(vm.api_socket, timeout=timeout)

    def _require_process(self, vm: VmDir) -> ProcessRef:
        ref = self.live_process(vm)
        if ref is None:
            raise RuntimeFailure(f"the qemu process of VM {vm.vm_id} is not running")
        return ref

    async def _start_process(self, vm: VmDir, config: vm_pb2.VmConfig) -> ProcessRef:
        """A fresh QEMU process for vm, paused before the guest's first instruction."""
        raise_violations(config_violations(config))  # before anything changes on the host
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
        events.prepare(vm)
        self._events.forget(vm)
        ref = await process.spawn(launch.argv, vm.console_log, cwd=vm.path,
                                  hypervisor_log=vm.hypervisor_log,
                                  exit_file=vm.exit_status_file,
                                  confinement=Confinement.load(vm))
        self.save_process(vm, ref, api_socket=str(vm.api_socket),
                          **{record.ACCEL: accel.accel.value, record.ACCEL_REASON: accel.reason,
                             record.MACHINE: launch.machine.value, record.PORTS: launch.ports,
                             record.PORT_COUNT: launch.port_count,
                             record.CONFIG: json_format.MessageToDict(config)})
        self._metrics.forget(vm)
        try:
            await self._wait_for_qmp(vm, ref)
            async with self._qmp(vm) as qmp:
                await pin_vcpus(vm, qmp, config)
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


def _liveness(ref: ProcessRef) -> Callable[[], bool]:
    return lambda: process.is_alive(ref)


def _console_excerpt(vm: VmDir) -> str:
    tail = hypervisor_log_tail(vm, lines=5)
    return f"; qemu said: {tail}" if tail else ""
