"""A typed client of Cloud Hypervisor's HTTP API (v53.0) over its Unix socket.

Each method is one documented endpoint under /api/v1: actions are PUT, queries GET.
Cloud Hypervisor answers a refusal with a JSON array of strings, the error chain
from outermost to innermost (["Error from API", "The VM could not boot", ...]);
it raises CloudHypervisorApiError carrying that chain, whose message joins it
with ": ". A socket that does not answer raises RuntimeFailure (UNAVAILABLE).

The request documents below name only the fields this project sets; Cloud
Hypervisor fills every other field with its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict

import httpx

from agent.hypervisors.errors import HypervisorApiError, RuntimeFailure
from agent.hypervisors.unix_http import ApiResponse, UnixHttpClient

API_ROOT = "/api/v1"


# ---- request documents (vmm/src/vm_config.rs) ------------------------------------------


class TokenBucketJson(TypedDict, total=False):
    size: int  # bytes or operations per refill
    one_time_burst: int
    refill_time: int  # milliseconds


class RateLimiterJson(TypedDict, total=False):
    bandwidth: TokenBucketJson
    ops: TokenBucketJson


class CpuTopologyJson(TypedDict):
    threads_per_core: int
    cores_per_die: int
    dies_per_package: int
    packages: int


class CpuAffinityJson(TypedDict):
    vcpu: int
    host_cpus: list[int]


class _CpusRequired(TypedDict):
    boot_vcpus: int
    max_vcpus: int


class CpusJson(_CpusRequired, total=False):
    topology: CpuTopologyJson
    affinity: list[CpuAffinityJson]


class MemoryZoneJson(TypedDict, total=False):
    id: str
    size: int
    shared: bool
    hugepages: bool
    hugepage_size: int


class _MemoryRequired(TypedDict):
    size: int  # bytes


class MemoryJson(_MemoryRequired, total=False):
    hotplug_size: int
    shared: bool
    hugepages: bool
    hugepage_size: int
    zones: list[MemoryZoneJson]


class PayloadJson(TypedDict, total=False):
    kernel: str
    initramfs: str
    cmdline: str


class DiskJson(TypedDict, total=False):
    id: str
    path: str
    readonly: bool
    direct: bool
    num_queues: int
    queue_size: int
    vhost_user: bool
    vhost_socket: str
    rate_limiter_config: RateLimiterJson
    disable_io_uring: bool
    disable_aio: bool
    serial: str
    image_type: str  # "Raw" | "Qcow2" | "FixedVhd" | "Vhdx"


class NetJson(TypedDict, total=False):
    id: str
    tap: str
    mac: str
    host_mac: str
    mtu: int
    num_queues: int
    queue_size: int
    vhost_user: bool
    vhost_socket: str
    vhost_mode: str  # "Client" | "Server"
    rate_limiter_config: RateLimiterJson


class DeviceJson(TypedDict, total=False):
    """A VFIO device (SR-IOV virtual function) by its sysfs path."""

    id: str
    path: str


class _ConsoleRequired(TypedDict):
    mode: str  # "Off" | "Pty" | "Tty" | "File" | "Socket" | "Null"


class ConsoleJson(_ConsoleRequired, total=False):
    file: str
    socket: str


class RngJson(TypedDict):
    src: str


class NumaNodeJson(TypedDict, total=False):
    guest_numa_id: int
    cpus: list[int]
    memory_zones: list[str]


class LandlockRuleJson(TypedDict):
    path: str
    access: str  # "r", "w" or "rw"


class VmConfigJson(TypedDict, total=False):
    cpus: CpusJson
    memory: MemoryJson
    payload: PayloadJson
    disks: list[DiskJson]
    net: list[NetJson]
    devices: list[DeviceJson]
    rng: RngJson
    serial: ConsoleJson
    console: ConsoleJson
    numa: list[NumaNodeJson]
    # A pvpanic device: a guest kernel panic becomes a ("guest", "panic") event.
    pvpanic: bool
    landlock_enable: bool
    landlock_rules: list[LandlockRuleJson]


# ---- answers ----------------------------------------------------------------------------


class VmState(StrEnum):
    """`state` of GET vm.info."""

    CREATED = "Created"
    RUNNING = "Running"
    SHUTDOWN = "Shutdown"
    PAUSED = "Paused"


@dataclass(frozen=True)
class VmmPing:
    version: str
    build_version: str
    pid: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class VmInfo:
    # A VmState value, kept as text so that a state a newer release adds is not an error.
    state: str
    # The VmConfig as the VMM now holds it: defaults filled in, generated device ids,
    # and every hotplug change applied.
    config: dict[str, Any]
    memory_actual_size: int
    device_tree: dict[str, Any]
    # Whether the VMM holds a built VM, not only its config: vm.info has a device tree
    # then. A VM whose vm.boot failed half way is built and still "Created"; Cloud
    # Hypervisor refuses every later vm.boot until vm.shutdown or vm.delete drops it.
    built: bool = False

    def devices(self, kind: str) -> list[dict[str, Any]]:
        """The config's "disks" or "net" entries."""
        entries = self.config.get(kind) or []
        return [e for e in entries if isinstance(e, dict)]


@dataclass(frozen=True)
class PciDeviceInfo:
    id: str
    bdf: str


# ---- errors -----------------------------------------------------------------------------


def error_chain(response: ApiResponse) -> list[str]:
    """Cloud Hypervisor's error chain; an empty 400 has none."""
    body = response.body
    if isinstance(body, list) and all(isinstance(item, str) for item in body):
        return [str(item) for item in body]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        # micro_http's own answer to a request it cannot parse.
        return [str(body["error"]).replace("\n", " ")]
    text = response.text.strip()
    return [text] if text else []


def _status_code(status: int) -> str:
    if status == 400:
        return "INTERNAL"  # the request itself was malformed: a bug on this side
    if status == 429:
        return "UNAVAILABLE"  # retry once the guest has released the vCPUs
    return "FAILED_PRECONDITION"


class CloudHypervisorApiError(HypervisorApiError):
    """Cloud Hypervisor refused a request; `chain` is its error chain, verbatim."""

    def __init__(self, method: str, path: str, status: int, chain: list[str]) -> None:
        detail = ": ".join(chain) if chain else "no error body"
        super().__init__(f"cloud-hypervisor refused {method} {path} (HTTP {status}): {detail}",
                         _status_code(status))
        self.status = status
        self.chain = chain

    @property
    def vm_not_created(self) -> bool:
        """The VMM holds no VM config (VmNotCreated / VmMissingConfig)."""
        return self.status == 404


# ---- the client -------------------------------------------------------------------------


class CloudHypervisorApi:
    """One Cloud Hypervisor process's API. Use as an async context manager."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._http = UnixHttpClient(socket_path, timeout=timeout)

    async def __aenter__(self) -> CloudHypervisorApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- the VMM

    async def ping(self) -> VmmPing:
        body = await self._get_object("vmm.ping")
        features = body.get("features") or []
        return VmmPing(version=str(body.get("version", "")),
                       build_version=str(body.get("build_version", "")),
                       pid=int(body.get("pid", 0)),
                       features=tuple(str(f) for f in features))

    async def shutdown_vmm(self) -> None:
        """Delete the VM and end the VMM process."""
        await self._put("vmm.shutdown")

    # ---- the VM's lifecycle

    async def create_vm(self, config: VmConfigJson) -> None:
        await self._put("vm.create", config)

    async def boot_vm(self) -> None:
        await self._put("vm.boot")

    async def pause_vm(self) -> None:
        await self._put("vm.pause")

    async def resume_vm(self) -> None:
        await self._put("vm.resume")

    async def power_button(self) -> None:
        """Press the ACPI power button; a guest with ACPI support powers off."""
        await self._put("vm.power-button")

    async def shutdown_vm(self) -> None:
        """Stop the VM at once; the VMM keeps its config and can boot it again."""
        await self._put("vm.shutdown")

    async def reboot_vm(self) -> None:
        """Reset: the VMM tears the VM down and boots it again from its config."""
        await self._put("vm.reboot")

    async def delete_vm(self) -> None:
        await self._put("vm.delete")

    # ---- queries

    async def vm_info(self) -> VmInfo:
        body = await self._get_object("vm.info")
        config = body.get("config")
        tree = body.get("device_tree")
        return VmInfo(state=str(body.get("state", "")),
                      config=config if isinstance(config, dict) else {},
                      memory_actual_size=int(body.get("memory_actual_size") or 0),
                      device_tree=tree if isinstance(tree, dict) else {},
                      built=isinstance(tree, dict))

    async def vm_counters(self) -> dict[str, dict[str, int]]:
        body = await self._get_object("vm.counters")
        return {str(device): {str(k): int(v) for k, v in counters.items()
                              if isinstance(v, int)}
                for device, counters in body.items() if isinstance(counters, dict)}

    # ---- hotplug

    async def resize(self, desired_vcpus: int | None = None,
                     desired_ram: int | None = None) -> None:
        body: dict[str, int] = {}
        if desired_vcpus is not None:
            body["desired_vcpus"] = desired_vcpus
        if desired_ram is not None:
            body["desired_ram"] = desired_ram
        await self._put("vm.resize", body)

    async def add_disk(self, disk: DiskJson) -> PciDeviceInfo | None:
        """Hot-add to a running VM (its PCI address), or cold-add before boot (None)."""
        return self._device_info(await self._put("vm.add-disk", disk))

    async def add_net(self, net: NetJson) -> PciDeviceInfo | None:
        return self._device_info(await self._put("vm.add-net", net))

    async def add_device(self, device: DeviceJson) -> PciDeviceInfo | None:
        """Pass a VFIO device (an SR-IOV virtual function) through."""
        return self._device_info(await self._put("vm.add-device", device))

    async def remove_device(self, device_id: str) -> None:
        await self._put("vm.remove-device", {"id": device_id})

    @staticmethod
    def _device_info(response: ApiResponse) -> PciDeviceInfo | None:
        body = response.body
        if response.status != 200 or not isinstance(body, dict):
            return None
        return PciDeviceInfo(id=str(body.get("id", "")), bdf=str(body.get("bdf", "")))

    # ---- transport

    async def _put(self, endpoint: str, body: Any = None) -> ApiResponse:
        # Action endpoints refuse any body, so None sends none at all.
        return await self._call("PUT", endpoint, body)

    async def _get_object(self, endpoint: str) -> dict[str, Any]:
        response = await self._call("GET", endpoint)
        if not isinstance(response.body, dict):
            raise HypervisorApiError(
                f"cloud-hypervisor answered GET {API_ROOT}/{endpoint} with a body that is not "
                f"a JSON object: {response.text[:200]!r}")
        return response.body

    async def _call(self, method: str, endpoint: str, body: Any = None) -> ApiResponse:
        path = f"{API_ROOT}/{endpoint}"
        try:
            response = await self._http.request(method, path, body)
        except httpx.HTTPError as e:
            raise RuntimeFailure(
                f"cloud-hypervisor API at {self.socket_path} did not answer {method} {path}: "
                f"{str(e) or type(e).__name__}", "UNAVAILABLE") from e
        if not response.ok:
            raise CloudHypervisorApiError(method, path, response.status, error_chain(response))
        return response
