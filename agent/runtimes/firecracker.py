"""The Firecracker runtime: one `firecracker --api-sock` process per VM, driven
through Firecracker's HTTP API.

Firecracker is configured piece by piece before `InstanceStart` and cannot be
configured again afterwards, so a process serves exactly one boot. It has no
in-place shutdown or reboot either: the only stop signal a guest sees is
Ctrl+Alt+Del on the emulated i8042 controller. A Linux guest answers it by
rebooting, and Firecracker exits when its guest reboots. Shutdown is therefore
Ctrl+Alt+Del, a bounded wait and a kill; reboot is a shutdown followed by a
fresh, freshly configured process.

With boot.boot_options["ready_marker"] set, boot (and so reboot) returns once
the guest has printed that text on its serial console.

A guest kernel panic: the runtime adds `panic=1` to kernel args that set no panic
timeout, so a panicked guest reboots and Firecracker exits; the agent tells that
from an orderly reboot by the kernel's panic line on the serial console. The
serial console (Firecracker's stdout) carries nothing else: Firecracker's logger is
set on its command line, to the VM's hypervisor.log.

Everything needed after an agent restart is in the VM's runtime.json: the
process reference (pid, start time), `booted_at` once the guest was started and
`stopped_at` once the agent stopped it. The in-memory samples only serve rate
calculations and are rebuilt when missing.

A Firecracker process changes its instance state only when its API is asked to
(InstanceStart, pause, resume), and otherwise only by exiting. So the state this
runtime itself saw or set on a process that is still alive is the state it is in:
observe answers from it without a round trip to the API, and asks the API for any
process this agent run has not driven (an adopted one) or after an API call that
failed part way.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent import process
from agent.firecracker_jail import LOG_FILE as JAILED_LOG_FILE
from agent.firecracker_jail import METRICS_FILE as JAILED_METRICS_FILE
from agent.firecracker_jail import FirecrackerJailer
from agent.hypervisors.clients import METRICS_TIMEOUT, ClientCache
from agent.hypervisors.firecracker_api import (
    FirecrackerApi,
    InstanceInfo,
    InstanceState,
)
from agent.jail import Confinement
from agent.process import ProcessRef
from agent.runtimes.base import (
    Observation,
    Runtime,
    RuntimeFailure,
    RuntimeSettings,
    UnsupportedOperation,
    find_binary,
    hypervisor_log_tail,
    rotate_log,
)
from agent.runtimes.firecracker_config import (
    MIB,
    config_violations,
    instance_id,
    translate,
)
from agent.runtimes.firecracker_metrics import MetricsTotals, VmSamples
from agent.runtimes.readiness import console_offset, ready_marker, wait_for_console_marker
from agent.vm_dir import VmDir
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)

GIB = 1024 * MIB

# ---- the Firecracker column of the backend support matrix ------------------------------

_FULL = host_pb2.SUPPORT_FULL
_PARTIAL = host_pb2.SUPPORT_PARTIAL
_IGNORED = host_pb2.SUPPORT_IGNORED
_NONE = host_pb2.SUPPORT_NONE

SUPPORT_MATRIX: tuple[tuple[str, host_pb2.Support.ValueType, str], ...] = (
    # feature key            support    detail
    ("vm.create",            _FULL,     ""),
    ("vm.boot",              _FULL,     ""),
    ("vm.shutdown",          _PARTIAL,  "Ctrl+Alt+Del (force only)"),
    ("vm.pause_resume",      _FULL,     ""),
    ("vm.reboot",            _PARTIAL,  "Ctrl+Alt+Del (force only)"),
    ("vm.delete",            _FULL,     ""),
    ("cpu.vcpu_count",       _FULL,     "1-32 vCPUs"),
    ("cpu.hotplug",          _NONE,     ""),
    ("cpu.max_vcpu_count",   _IGNORED,  "ignored - no hotplug support"),
    ("cpu.topology",         _NONE,     "basic: no sockets, cores or NUMA"),
    ("cpu.affinity",         _NONE,     ""),
    ("memory.size",          _FULL,     "128 MiB - 32 GiB"),
    ("memory.hotplug",       _NONE,     ""),
    ("memory.hugepages",     _NONE,     ""),
    ("memory.numa",          _NONE,     ""),
    ("memory.sharing",       _NONE,     ""),
    ("storage.block",        _FULL,     "files and raw block devices"),
    ("storage.read_only",    _FULL,     ""),
    ("storage.multiple",     _FULL,     "~10 devices"),
    ("storage.hotplug",      _NONE,     ""),
    ("storage.advanced_io",  _PARTIAL,  "basic: cache_type, io_engine, rate limits"),
    ("network.tap",          _FULL,     "single/few"),
    ("network.mac",          _FULL,     ""),
    ("network.vhost_user",   _NONE,     ""),
    ("network.hotplug",      _NONE,     ""),
    ("network.sriov",        _NONE,     ""),
    ("console.serial",       _FULL,     ""),
    ("console.logging",      _FULL,     "file output"),
    ("debug.rich",           _PARTIAL,  "minimal"),
    ("debug.gdb",            _PARTIAL,  "limited: needs a Firecracker built with gdb support"),
)  # fmt: skip

LIMITS = host_pb2.BackendLimits(
    min_vcpus=1, max_vcpus=32,
    min_memory_bytes=128 * MIB, max_memory_bytes=32 * GIB,
    max_disks=10,  # the matrix: "~10 devices"
    max_nics=4,  # the matrix: "single/few"
)


_VM_STATES: dict[str, vm_pb2.VmState.ValueType] = {
    InstanceState.NOT_STARTED.value: vm_pb2.VM_STATE_CREATED,
    InstanceState.RUNNING.value: vm_pb2.VM_STATE_RUNNING,
    InstanceState.PAUSED.value: vm_pb2.VM_STATE_PAUSED,
}

# Module that runs the API simulator when no firecracker-sim script is on PATH.
SIMULATOR_MODULE = "tools.simulators.firecracker"


@dataclass(frozen=True)
class _Known:
    """The instance state this runtime last saw or set on one process."""

    ref: ProcessRef
    state: str  # an InstanceState value
    vmm_version: str



# ---- the runtime ----------------------------------------------------------------------


class FirecrackerRuntime(Runtime):
    name = features.FIRECRACKER

    def __init__(self, binary: str, simulated: bool, settings: RuntimeSettings,
                 command: Sequence[str] | None = None) -> None:
        super().__init__(binary, simulated, settings)
        # argv prefix that starts one Firecracker (or simulator) process.
        self.command: tuple[str, ...] = tuple(command) if command else (binary,)
        self._version: str | None = None
        self._samples: dict[Path, VmSamples] = {}
        # VM dir -> the instance state of its process, as this runtime last saw or set it.
        self._known: dict[Path, _Known] = {}
        # One keep-alive API client per VM for FlushMetrics.
        self._metrics_clients: ClientCache[FirecrackerApi] = ClientCache(
            partial(FirecrackerApi, timeout=METRICS_TIMEOUT))

    # ---- discovery and declarations -------------------------------------------------

    @classmethod
    def detect(cls, settings: RuntimeSettings) -> FirecrackerRuntime | None:
        if not settings.force_simulator:
            if settings.binary:
                binary = find_binary(settings.binary, ())
                if binary is None:
                    log.warning("firecracker binary not found: configured=%s", settings.binary)
                    return None
                return cls(binary, simulated=False, settings=settings)
            binary = find_binary(None, ("firecracker",))
            if binary:
                return cls(binary, simulated=False, settings=settings)
        simulator = shutil.which("firecracker-sim")
        if simulator:
            return cls(simulator, simulated=True, settings=settings)
        if importlib.util.find_spec(SIMULATOR_MODULE) is None:
            return None
        return cls(sys.executable, simulated=True, settings=settings,
                   command=(sys.executable, "-m", SIMULATOR_MODULE))

    def version(self) -> str:
        if self._version is None:
            self._version = "simulator" if self.simulated else self._binary_version()
        return self._version

    def _binary_version(self) -> str:
        # `firecracker --version` prints "Firecracker v1.14.2" first.
        try:
            done = subprocess.run([*self.command, "--version"], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("firecracker --version failed: %s", e)
            return ""
        first = (done.stdout.strip().splitlines() or [""])[0].strip()
        return first.removeprefix("Firecracker").strip().removeprefix("v")

    def capabilities(self) -> host_pb2.BackendCapabilities:
        return host_pb2.BackendCapabilities(
            backend=self.name,
            limits=LIMITS,
            features=[features.feature(key, support, detail)
                      for key, support, detail in SUPPORT_MATRIX],
        )

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        return config_violations(config)

    # ---- lifecycle ------------------------------------------------------------------

    async def create(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        await self._start_process(vm, desired)

    async def boot(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        ref = self.live_process(vm)
        if ref is None:
            ref = await self._start_process(vm, desired)
        since = console_offset(vm)
        self._known.pop(vm.path, None)
        async with self._api(vm) as api:
            info = await api.instance_info()
            if info.state == InstanceState.RUNNING:
                self._note(vm, ref, info.state, info.vmm_version)
                return
            if info.state == InstanceState.PAUSED:
                raise RuntimeFailure(f"VM {vm.vm_id} is paused: resume it rather than boot it")
            await api.start_instance()
        self._record(vm, ref, booted_at=time.time())
        self._note(vm, ref, InstanceState.RUNNING, info.vmm_version)
        marker = ready_marker(desired.config.boot.boot_options)
        if marker:
            await wait_for_console_marker(vm, marker, self.settings.boot_timeout, since,
                                          alive=lambda: process.is_alive(ref))

    async def pause(self, vm: VmDir) -> None:
        ref = self._require_process(vm)
        known = self._known.pop(vm.path, None)
        async with self._api(vm) as api:
            await api.pause()
        if known is not None:
            self._note(vm, ref, InstanceState.PAUSED, known.vmm_version)

    async def resume(self, vm: VmDir) -> None:
        ref = self._require_process(vm)
        known = self._known.pop(vm.path, None)
        async with self._api(vm) as api:
            await api.resume()
        if known is not None:
            self._note(vm, ref, InstanceState.RUNNING, known.vmm_version)

    # The Runtime interface names the parameter `timeout`.
    async def shutdown(self, vm: VmDir, force: bool, timeout: float) -> None:
        self._known.pop(vm.path, None)
        ref = self.live_process(vm)
        if ref is not None:
            if not force:
                await self._ctrl_alt_del(vm, ref, timeout)
            await process.kill(ref)
            # Keep the reference so observe() can tell this stop from a crash.
            self._record(vm, ref, stopped_at=time.time())
        vm.api_socket.unlink(missing_ok=True)
        self._samples.pop(vm.path, None)
        await self._metrics_clients.discard(vm.api_socket)

    async def reboot(self, vm: VmDir, desired: agent_pb2.DesiredVm, force: bool) -> None:
        timeout = desired.shutdown.timeout_seconds or self.settings.default_shutdown_timeout
        await self.shutdown(vm, force, timeout)
        await self.boot(vm, desired)

    def _jailer(self) -> FirecrackerJailer | None:
        # The simulator is no Firecracker binary the jailer could exec.
        return None if self.simulated else self.settings.jailer

    async def destroy(self, vm: VmDir) -> None:
        self._known.pop(vm.path, None)
        await super().destroy(vm)
        if jailer := self._jailer():
            jailer.remove(instance_id(vm.vm_id), self.binary)
        self._samples.pop(vm.path, None)
        await self._metrics_clients.discard(vm.api_socket)

    async def observe(self, vm: VmDir) -> Observation:
        info = {"api_socket": str(vm.api_socket), "simulated": str(self.simulated).lower()}
        known = self._known.get(vm.path)
        if known is not None and process.is_alive(known.ref):
            # This runtime started the process (and recorded it), drove it to that state,
            # and it still runs.
            info["pid"] = str(known.ref.pid)
            info["firecracker_version"] = known.vmm_version
            return Observation(alive=True, state=_VM_STATES[known.state], pid=known.ref.pid,
                               backend_info=info)
        data = vm.load_runtime()
        ref = ProcessRef.from_dict(data)
        if ref is None:
            return Observation(alive=False, detail="no firecracker process recorded",
                               backend_info=info)
        info["pid"] = str(ref.pid)
        if not process.is_alive(ref):
            detail = process.exit_detail(ref)
            if "stopped_at" in data:
                return Observation(alive=False, pid=ref.pid, clean_exit=True,
                                   detail=f"stopped by the agent ({detail})", backend_info=info)
            return Observation(alive=False, pid=ref.pid, detail=detail,
                               clean_exit=process.exit_status(ref) == 0, backend_info=info)
        try:
            async with FirecrackerApi(vm.api_socket, timeout=2.0) as api:
                instance = await api.instance_info()
        except RuntimeFailure as e:
            return Observation(alive=True, pid=ref.pid, detail=e.message, backend_info=info)
        info["firecracker_version"] = instance.vmm_version
        state = _VM_STATES.get(instance.state, vm_pb2.VM_STATE_UNSPECIFIED)
        detail = "" if state else f"unknown firecracker state {instance.state!r}"
        return Observation(alive=True, state=state, pid=ref.pid, detail=detail,
                           backend_info=info)

    async def metrics(self, vm: VmDir) -> vm_pb2.VmMetrics:
        data = vm.load_runtime()
        ref = ProcessRef.from_dict(data)
        if ref is None or not process.is_alive(ref):
            await self._metrics_clients.discard(vm.api_socket)
            return vm_pb2.VmMetrics()
        booted_at = data.get("booted_at")
        if isinstance(booted_at, int | float):
            # Firecracker refuses FlushMetrics before the guest starts.
            api = await self._metrics_clients.get(vm.api_socket, ref.pid)
            try:
                await api.flush_metrics()
            except BaseException:
                await self._metrics_clients.discard(vm.api_socket)
                raise
        samples = self._samples.get(vm.path)
        if samples is None or samples.pid != ref.pid:
            # No earlier reading of this process: average since it started.
            samples = VmSamples(ref.pid, MetricsTotals(vm.metrics_file), ref.started_at, 0.0)
            self._samples[vm.path] = samples
        samples.metrics.update()
        now, cpu = time.time(), process.cpu_seconds(ref)
        elapsed = now - samples.cpu_at
        cpu_percent = max(0.0, (cpu - samples.cpu_seconds) / elapsed * 100) if elapsed > 0 else 0.0
        samples.cpu_at, samples.cpu_seconds = now, cpu
        return vm_pb2.VmMetrics(
            cpu_usage_percent=cpu_percent,
            memory_usage_bytes=process.rss_bytes(ref),
            network_stats=samples.metrics.network_stats(),
            storage_stats=samples.metrics.storage_stats(),
            uptime_seconds=int(now - booted_at) if isinstance(booted_at, int | float) else 0,
        )

    async def hotplug(self, vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
        change = request.WhichOneof("change")
        if change == "resize" and not request.resize.vcpu_count:
            key = "memory.hotplug"
        else:
            key = {"resize": "cpu.hotplug", "attach_disk": "storage.hotplug",
                   "detach_disk": "storage.hotplug", "attach_nic": "network.hotplug",
                   "detach_nic": "network.hotplug"}.get(change or "", "cpu.hotplug")
        raise UnsupportedOperation(self.name, features.FEATURES_BY_KEY[key].title)

    # ---- process and API plumbing ---------------------------------------------------

    def _api(self, vm: VmDir) -> FirecrackerApi:
        return FirecrackerApi(vm.api_socket)

    def _record(self, vm: VmDir, ref: ProcessRef, **extra: object) -> None:
        self.save_process(vm, ref, api_socket=str(vm.api_socket), **extra)

    def _note(self, vm: VmDir, ref: ProcessRef, state: str, vmm_version: str) -> None:
        """Remember the state an API call of this runtime just saw or left the process in."""
        if state in _VM_STATES:
            self._known[vm.path] = _Known(ref, state, vmm_version)

    def _require_process(self, vm: VmDir) -> ProcessRef:
        ref = self.live_process(vm)
        if ref is None:
            raise RuntimeFailure(f"the firecracker process of VM {vm.vm_id} is not running")
        return ref

    async def _start_process(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> ProcessRef:
        """A fresh Firecracker process for vm, configured from desired and not started."""
        config = translate(desired.config)  # before anything changes on the host
        self._known.pop(vm.path, None)
        leftover = self.load_process(vm)
        if leftover is not None:  # e.g. from a create that was interrupted
            await process.kill(leftover)
        vm.create()
        # Firecracker refuses to start over an existing socket file.
        vm.api_socket.unlink(missing_ok=True)
        jailer = self._jailer()
        confinement = Confinement.load(vm)
        metrics_file = vm.metrics_file
        # The logger is set on the command line so that not even Firecracker's first lines
        # reach its stdout, which is the guest's serial console. Info level: Firecracker
        # then logs every API request it serves, an audit trail of what the agent asked.
        logger = ["--log-path", str(vm.hypervisor_log), "--level", "Info"]
        if jailer is None:
            # Firecracker writes its log from the file's start without truncating it: each
            # process gets a fresh file, the previous one's kept beside it. Older releases
            # only open existing log and metrics files.
            rotate_log(vm.hypervisor_log)
            vm.metrics_file.touch()
            started = await process.start(
                [*self.command, "--api-sock", str(vm.api_socket), "--id",
                 instance_id(vm.vm_id), *logger],
                vm.console_log, cwd=vm.path, hypervisor_log=vm.hypervisor_log,
                exit_file=vm.exit_status_file, confinement=confinement)
        else:
            jail_id = instance_id(vm.vm_id)
            root = jailer.root(jail_id, self.binary)
            jailer.keep_previous_log(vm)
            jailer.remove(jail_id, self.binary)  # what a previous process of the VM left
            config = translate(jailer.place(vm, root, desired.config, confinement))
            jailer.link_socket(vm, root)
            metrics_file = Path(JAILED_METRICS_FILE)
            logger = ["--log-path", JAILED_LOG_FILE, "--level", "Info"]
            # The jailer drops to the uid itself; the agent only moves it into the cgroup.
            started = await process.start(
                jailer.argv(jail_id, self.binary, confinement, logger),
                vm.console_log, cwd=vm.path, hypervisor_log=vm.hypervisor_log,
                exit_file=vm.exit_status_file,
                confinement=Confinement(cgroup_procs=confinement.cgroup_procs))
        ref = started.ref
        self._record(vm, ref)
        self._samples.pop(vm.path, None)
        try:
            info = await self._wait_for_api(vm, ref)
            async with self._api(vm) as api:
                await api.put_metrics(metrics_file)
                await api.put_machine_config(config.machine)
                await api.put_boot_source(config.boot)
                for drive in config.drives:
                    await api.put_drive(drive)
                for nic in config.nics:
                    await api.put_network_interface(nic)
                if config.mmds is not None:
                    await api.put_mmds_config(config.mmds_interfaces)
                    await api.put_mmds(config.mmds)
            # Configured while it was being moved into its cgroup; there before it boots.
            await started.confined
        except BaseException:
            # A half-configured process is of no use: leave nothing behind.
            await process.kill(ref)
            vm.api_socket.unlink(missing_ok=True)
            vm.clear_runtime()
            raise
        # Configuration leaves the instance as the first answer found it: not started.
        self._note(vm, ref, info.state, info.vmm_version)
        log.info("firecracker_configured vm_id=%s pid=%d", vm.vm_id, ref.pid)
        return ref

    async def _wait_for_api(self, vm: VmDir, ref: ProcessRef) -> InstanceInfo:
        """The process's first answer on its API socket."""
        deadline = time.monotonic() + self.settings.socket_timeout
        try:
            await process.wait_for_socket(vm.api_socket, ref, self.settings.socket_timeout)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeFailure(f"firecracker did not start for VM {vm.vm_id}: {e}"
                                 f"{_console_excerpt(vm)}", "UNAVAILABLE") from e
        # The socket file appears at bind(); answer only comes once the server listens.
        while True:
            try:
                async with self._api(vm) as api:
                    return await api.instance_info()
            except RuntimeFailure:
                if time.monotonic() > deadline or not process.is_alive(ref):
                    raise
            await asyncio.sleep(0.005)

    async def _ctrl_alt_del(self, vm: VmDir, ref: ProcessRef, wait_seconds: float) -> None:
        """Ask the guest to stop; wait up to wait_seconds for Firecracker to exit with it."""
        try:
            async with self._api(vm) as api:
                state = (await api.instance_info()).state
                if state == InstanceState.NOT_STARTED:
                    return  # no guest to ask
                if state == InstanceState.PAUSED:
                    await api.resume()  # a paused guest would never see the key press
                await api.send_ctrl_alt_del()
        except RuntimeFailure as e:
            log.warning("ctrl_alt_del_failed vm_id=%s error=%s", vm.vm_id, e.message)
            return
        if not await process.wait_exit(ref, wait_seconds):
            log.info("ctrl_alt_del_unanswered vm_id=%s waited_s=%s", vm.vm_id, wait_seconds)


def _console_excerpt(vm: VmDir) -> str:
    tail = hypervisor_log_tail(vm, lines=5)
    return f"; firecracker said: {tail}" if tail else ""
