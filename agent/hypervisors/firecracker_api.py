"""A typed client of Firecracker's HTTP API (v1.14) over its Unix socket.

Each method is one documented endpoint. A refusal (any non-2xx answer) raises
HypervisorApiError whose message carries Firecracker's own `fault_message`
verbatim; a socket that does not answer raises RuntimeFailure (UNAVAILABLE).
Bodies carry only the fields that are set: Firecracker rejects unknown fields
and resets omitted optional ones to their defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from agent.hypervisors.errors import HypervisorApiError, RuntimeFailure
from agent.hypervisors.unix_http import ApiResponse, UnixHttpClient


class InstanceState(StrEnum):
    """The `state` of GET /."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    state: str  # an InstanceState value, kept as text so a new state is not an error
    vmm_version: str


@dataclass(frozen=True)
class TokenBucket:
    # Tokens (bytes or operations) the bucket holds and refills every refill_time_ms.
    size: int
    refill_time_ms: int = 1000
    one_time_burst: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"size": self.size, "refill_time": self.refill_time_ms}
        if self.one_time_burst is not None:
            body["one_time_burst"] = self.one_time_burst
        return body


@dataclass(frozen=True)
class RateLimiter:
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.bandwidth is not None:
            body["bandwidth"] = self.bandwidth.to_json()
        if self.ops is not None:
            body["ops"] = self.ops.to_json()
        return body


@dataclass(frozen=True)
class MachineConfig:
    vcpu_count: int
    mem_size_mib: int
    smt: bool = False
    # Only accepted by Firecracker builds with the `gdb` feature.
    gdb_socket_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"vcpu_count": self.vcpu_count,
                                "mem_size_mib": self.mem_size_mib, "smt": self.smt}
        if self.gdb_socket_path:
            body["gdb_socket_path"] = self.gdb_socket_path
        return body


@dataclass(frozen=True)
class BootSource:
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kernel_image_path": self.kernel_image_path}
        if self.boot_args:
            body["boot_args"] = self.boot_args
        if self.initrd_path:
            body["initrd_path"] = self.initrd_path
        return body


@dataclass(frozen=True)
class Drive:
    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool = False
    cache_type: str | None = None  # "Unsafe" | "Writeback"
    io_engine: str | None = None  # "Sync" | "Async"
    rate_limiter: RateLimiter | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "drive_id": self.drive_id,
            "path_on_host": self.path_on_host,
            "is_root_device": self.is_root_device,
            "is_read_only": self.is_read_only,
        }
        if self.cache_type:
            body["cache_type"] = self.cache_type
        if self.io_engine:
            body["io_engine"] = self.io_engine
        if self.rate_limiter is not None:
            body["rate_limiter"] = self.rate_limiter.to_json()
        return body


@dataclass(frozen=True)
class NetworkInterface:
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"iface_id": self.iface_id, "host_dev_name": self.host_dev_name}
        if self.guest_mac:
            body["guest_mac"] = self.guest_mac
        if self.rx_rate_limiter is not None:
            body["rx_rate_limiter"] = self.rx_rate_limiter.to_json()
        if self.tx_rate_limiter is not None:
            body["tx_rate_limiter"] = self.tx_rate_limiter.to_json()
        return body


def fault_text(response: ApiResponse) -> str:
    """Firecracker's error text: `fault_message`, else the `error` of its non-schema
    bodies (e.g. an unsupported HTTP method), else the raw body."""
    body = response.body
    if isinstance(body, dict):
        for key in ("fault_message", "error"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return response.text.strip() or f"HTTP {response.status}"


class FirecrackerApi:
    """One Firecracker process's API. Use as an async context manager."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._http = UnixHttpClient(socket_path, timeout=timeout)

    async def __aenter__(self) -> FirecrackerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- queries --------------------------------------------------------------------

    async def instance_info(self) -> InstanceInfo:
        body = await self._get("/")
        return InstanceInfo(id=str(body.get("id", "")), state=str(body.get("state", "")),
                            vmm_version=str(body.get("vmm_version", "")))

    async def version(self) -> str:
        return str((await self._get("/version")).get("firecracker_version", ""))

    # ---- pre-boot configuration -----------------------------------------------------

    async def put_logger(self, log_path: Path, level: str = "Warning") -> None:
        await self._call("PUT", "/logger", {"log_path": str(log_path), "level": level})

    async def put_metrics(self, metrics_path: Path) -> None:
        await self._call("PUT", "/metrics", {"metrics_path": str(metrics_path)})

    async def put_machine_config(self, config: MachineConfig) -> None:
        await self._call("PUT", "/machine-config", config.to_json())

    async def put_boot_source(self, boot: BootSource) -> None:
        await self._call("PUT", "/boot-source", boot.to_json())

    async def put_drive(self, drive: Drive) -> None:
        await self._call("PUT", f"/drives/{drive.drive_id}", drive.to_json())

    async def put_network_interface(self, nic: NetworkInterface) -> None:
        await self._call("PUT", f"/network-interfaces/{nic.iface_id}", nic.to_json())

    async def put_mmds_config(self, iface_ids: Sequence[str]) -> None:
        """Serve MMDS (version 2, session tokens) to the guest on these interfaces."""
        await self._call("PUT", "/mmds/config",
                         {"version": "V2", "network_interfaces": list(iface_ids)})

    async def put_mmds(self, data: dict[str, Any]) -> None:
        await self._call("PUT", "/mmds", data)

    # ---- actions and state changes ------------------------------------------------------

    async def start_instance(self) -> None:
        await self._action("InstanceStart")

    async def send_ctrl_alt_del(self) -> None:
        await self._action("SendCtrlAltDel")

    async def flush_metrics(self) -> None:
        await self._action("FlushMetrics")

    async def pause(self) -> None:
        await self._call("PATCH", "/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self._call("PATCH", "/vm", {"state": "Resumed"})

    # ---- transport ------------------------------------------------------------------

    async def _action(self, action_type: str) -> None:
        await self._call("PUT", "/actions", {"action_type": action_type})

    async def _get(self, path: str) -> dict[str, Any]:
        response = await self._call("GET", path)
        if not isinstance(response.body, dict):
            raise HypervisorApiError(
                f"firecracker answered GET {path} with a body that is not a JSON object: "
                f"{response.text[:200]!r}")
        return response.body

    async def _call(self, method: str, path: str, body: Any = None) -> ApiResponse:
        try:
            response = await self._http.request(method, path, body)
        except httpx.HTTPError as e:
            raise RuntimeFailure(
                f"firecracker API at {self.socket_path} did not answer {method} {path}: "
                f"{str(e) or type(e).__name__}", "UNAVAILABLE") from e
        if not response.ok:
            raise HypervisorApiError(
                f"firecracker refused {method} {path}: {fault_text(response)}")
        return response
