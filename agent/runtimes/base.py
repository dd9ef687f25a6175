"""The interface every backend runtime implements, and what they share.

A runtime drives one kind of hypervisor process per VM through that
hypervisor's own API. The agent's reconciler calls it; the runtime never
decides *what* state a VM should be in, only *how* to get it there.

State a runtime needs after an agent restart lives in the VM's directory
(`VmDir.runtime_file`, via `save_process` / `load_process`), never in memory only.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from agent import process
from agent.firecracker_jail import FirecrackerJailer
from agent.hypervisors.errors import RuntimeFailure as RuntimeFailure
from agent.process import ProcessRef
from agent.vm_dir import VmDir
from vmm.agent.v1 import agent_pb2
from vmm.common import failpoints
from vmm.v1 import host_pb2, vm_pb2


class GuestNotReady(RuntimeFailure):
    """The guest never printed its readiness marker (or its hypervisor died first).
    The VM is failed: the agent stops it and reports the message, console tail included."""


class UnsupportedOperation(RuntimeFailure):
    """The backend cannot do this at all (e.g. CPU hotplug on Firecracker)."""

    def __init__(self, backend: str, feature_title: str) -> None:
        super().__init__(f"{feature_title} is not supported by {backend}", "FAILED_PRECONDITION")


@dataclass
class Observation:
    """What a runtime sees of one VM right now."""

    # Is the hypervisor process alive?
    alive: bool
    # The VM state as the hypervisor reports it (UNSPECIFIED if it cannot be asked).
    state: vm_pb2.VmState.ValueType = vm_pb2.VM_STATE_UNSPECIFIED
    pid: int = 0
    # Why, when the process is gone or the API did not answer.
    detail: str = ""
    # Whether the process ended cleanly (the guest powered off / rebooted).
    clean_exit: bool = False
    # The hypervisor reported a guest kernel panic (a pvpanic device).
    guest_panic: bool = False
    backend_info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeSettings:
    """Agent-wide settings a runtime may use."""

    # Explicit hypervisor binary; None means look on PATH, then fall back to the simulator.
    binary: str | None = None
    # Use the API simulator even when a real binary exists.
    force_simulator: bool = False
    # Seconds a guest gets to stop by itself when a shutdown request names no timeout.
    default_shutdown_timeout: float = 10.0
    # Seconds to wait for the hypervisor to create its API socket.
    socket_timeout: float = 10.0
    # Seconds a guest may take to print its readiness marker (when it names one).
    boot_timeout: float = 60.0
    # Acceleration for backends that can choose (QEMU): auto | kvm | tcg.
    accel: str = "auto"
    # The host path policy's roots: what a sandbox (Cloud Hypervisor's Landlock) must let
    # the hypervisor reach beyond the files of its boot config, for hot-plugged devices.
    host_path_roots: tuple[str, ...] = ()
    # Firecracker's jailer, where configured: each Firecracker then runs in its chroot.
    jailer: FirecrackerJailer | None = None


class Runtime(ABC):
    """One backend. Subclasses set `name` (a vmm.features backend name)."""

    name: str = ""
    # Whether the hypervisor enforces a NIC's rate_limit_* options itself; where it does
    # not, the agent shapes the NIC's TAP on the host instead.
    limits_nic_rate: bool = True

    def __init__(self, binary: str, simulated: bool, settings: RuntimeSettings) -> None:
        self.binary = binary
        self.simulated = simulated
        self.settings = settings

    # ---- discovery and declarations -------------------------------------------------

    @classmethod
    @abstractmethod
    def detect(cls, settings: RuntimeSettings) -> Runtime | None:
        """The runtime for this host: the real binary (configured, then PATH) when present,
        else the project's simulator, else None."""

    @abstractmethod
    def capabilities(self) -> host_pb2.BackendCapabilities:
        """The backend's row of the support matrix and its limits (pure data)."""

    def version(self) -> str:
        return ""

    def describe(self) -> host_pb2.Backend:
        return host_pb2.Backend(
            name=self.name,
            simulated=self.simulated,
            version=self.version(),
            binary_path=self.binary,
            capabilities=self.capabilities(),
        )

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        """Host-local checks before anything is stored: devices are usable, the backend
        can express the config. (The agent's host path policy checks the files.)

        The controller has already checked the config against `capabilities()`.
        """
        return []

    def files_written(self, vm: VmDir) -> list[Path]:
        """Files in the VM dir the hypervisor itself opens by path to write (the agent
        hands them to the VM's uid before it starts)."""
        return [vm.console_log, vm.hypervisor_log, vm.metrics_file]

    # ---- lifecycle ------------------------------------------------------------------

    @abstractmethod
    async def create(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        """Start the hypervisor process and configure the VM without booting it (CREATED)."""

    @abstractmethod
    async def boot(self, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        """Boot the guest (RUNNING). Works from CREATED and, by starting a fresh process
        when the old one is gone, from SHUTDOWN and FAILED."""

    @abstractmethod
    async def pause(self, vm: VmDir) -> None: ...

    @abstractmethod
    async def resume(self, vm: VmDir) -> None: ...

    @abstractmethod
    async def shutdown(self, vm: VmDir, force: bool, timeout: float) -> None:
        """Stop the guest (SHUTDOWN): gracefully where the backend can, waiting up to
        timeout seconds, then forcibly. `force` skips the graceful step."""

    @abstractmethod
    async def reboot(self, vm: VmDir, desired: agent_pb2.DesiredVm, force: bool) -> None:
        """Restart the guest; the VM is RUNNING afterwards."""

    async def destroy(self, vm: VmDir) -> None:
        """Stop the hypervisor process for good and remove its sockets.
        The caller removes the VM directory."""
        ref = self.load_process(vm)
        if ref is not None:
            await process.kill(ref)
        vm.api_socket.unlink(missing_ok=True)
        vm.clear_runtime()

    @abstractmethod
    async def observe(self, vm: VmDir) -> Observation:
        """The VM's current state, asked of the live hypervisor. Used to adopt VMs after
        an agent restart and to notice crashes. Must not change anything."""

    def nic_queue_pairs(self, nic: vm_pb2.NetworkInterface) -> int:
        """The queue pairs the hypervisor opens the NIC's TAP with: a TAP with more than
        one must be made multi-queue (the kernel refuses a mismatched open)."""
        return 1

    async def metrics(self, vm: VmDir) -> vm_pb2.VmMetrics:
        return vm_pb2.VmMetrics()

    async def hotplug(self, vm: VmDir, request: agent_pb2.HotplugRequest) -> vm_pb2.VmConfig:
        """Apply a resource change to a running VM; returns the config as it now runs."""
        raise UnsupportedOperation(self.name, "Hotplug")

    # ---- shared helpers -------------------------------------------------------------

    def save_process(self, vm: VmDir, ref: ProcessRef, **extra: object) -> None:
        vm.save_runtime({"backend": self.name, "simulated": self.simulated, **ref.to_dict(),
                         **extra})
        failpoints.hit("agent.runtime.recorded", vm.vm_id)

    def load_process(self, vm: VmDir) -> ProcessRef | None:
        return ProcessRef.from_dict(vm.load_runtime())

    def guest_panic_reported(self, vm: VmDir) -> bool:
        """Whether the hypervisor has reported a guest kernel panic (pvpanic) that observe
        would see. Called for every running VM on each monitor pass: cheap, no API call."""
        return False

    def live_process(self, vm: VmDir) -> ProcessRef | None:
        ref = self.load_process(vm)
        return ref if ref is not None and process.is_alive(ref) else None


def find_binary(configured: str | None, names: tuple[str, ...]) -> str | None:
    """A configured path if it is executable, else the first of names on PATH."""
    if configured:
        path = shutil.which(configured)
        return path
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def positive_int(value: str) -> int | None:
    """A device option's value as a positive integer, or None when it is not one."""
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def console_tail(vm: VmDir, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last lines of the guest's serial console."""
    return log_tail(vm.console_log, lines, max_bytes)


def hypervisor_log_tail(vm: VmDir, lines: int = 10) -> str:
    """The last lines of the hypervisor's own log (where its start-up errors go)."""
    return log_tail(vm.hypervisor_log, lines)


def rotate_log(path: Path) -> None:
    """Start path afresh, keeping what it held as path.1 (one previous process's log).
    The fresh file has the old one's owner: the VM's uid, which the hypervisor runs as."""
    owner = None
    if path.exists():
        st = path.stat()
        owner = (st.st_uid, st.st_gid)
        os.replace(path, path.with_name(path.name + ".1"))
    path.touch()
    if owner is not None:
        os.chown(path, *owner)


def log_tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def with_console_tail(vm: VmDir, reason: str, lines: int = 10) -> str:
    """A failure reason followed by the last lines of the guest's console."""
    tail = console_tail(vm, lines)
    return f"{reason}; console tail:\n{tail}" if tail else reason
