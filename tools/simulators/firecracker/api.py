"""Firecracker's API server layer: from an HTTP request to a VmmAction and back.

Routing follows v1.14.2's parsed_request.rs: the first path segment picks the
resource (`/drives/x` -> `drives`), ids must be non-empty and made of
alphanumerics and `_`, a body id must match the path id, and request errors
come back as 400 `{"fault_message": ...}`. Request counters of the metrics are
counted here, as Firecracker counts them while parsing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tools.simulators.firecracker import schemas
from tools.simulators.firecracker.json_reader import JsonError
from tools.simulators.firecracker.logger import Logger
from tools.simulators.firecracker.metrics import Metrics
from tools.simulators.firecracker.resources import ActionError
from tools.simulators.firecracker.rust_fmt import dumps, rust_debug_str
from tools.simulators.firecracker.serde import Schema, from_slice
from tools.simulators.firecracker.vmm import FatalActionError, Vmm
from tools.simulators.micro_http import Request, Response

METHOD_NAMES = {"GET": "Get", "PUT": "Put", "PATCH": "Patch"}
# Actions whose API-level latency Firecracker records and logs.
TIMED_ACTIONS = {"Pause": ("pause_vm", "pause vm"), "Resume": ("resume_vm", "resume vm"),
                 "LoadSnapshot": ("load_snapshot", "load snapshot")}


class RequestError(Exception):
    """parsed_request.rs's RequestError: fault_message text and `{:?}` log text."""

    def __init__(self, message: str, debug: str) -> None:
        super().__init__(message)
        self.message = message
        self.debug = debug

    @classmethod
    def generic(cls, message: str) -> RequestError:
        return cls(message, f"Generic(BadRequest, {rust_debug_str(message)})")

    @classmethod
    def invalid_path(cls, resource: str, method: str) -> RequestError:
        return cls(f"Invalid request method and/or path: {method} {resource}.",
                   f"InvalidPathMethod({rust_debug_str(resource)}, {METHOD_NAMES[method]})")

    @classmethod
    def serde(cls, err: JsonError) -> RequestError:
        return cls(f"An error occurred when deserializing the json body of a request: {err}.",
                   f"SerdeJson({err.debug()})")


EMPTY_ID = RequestError("The ID cannot be empty.", "EmptyID")
INVALID_ID = RequestError(
    "API Resource IDs can only contain alphanumeric characters and underscores.", "InvalidID")


class Parsed:
    """A request turned into a VmmAction, and the deprecation warning it earned."""

    def __init__(self, action: str, arg: Any = None, deprecation: str | None = None) -> None:
        self.action = action
        self.arg = arg
        self.deprecation = deprecation


class ApiHandler:
    def __init__(self, vmm: Vmm, logger: Logger, metrics: Metrics,
                 request_exit: Callable[[int], None]) -> None:
        self.vmm = vmm
        self.logger = logger
        self.metrics = metrics
        self.request_exit = request_exit

    def __call__(self, request: Request) -> Response:
        started = time.monotonic_ns()
        self.logger.info(f"The API server received a {_describe(request)}.")
        try:
            parsed = self._parse(request)
        except RequestError as err:
            self.logger.error(err.debug)
            return _fault(400, err.message)
        response = self._serve(parsed, started)
        if parsed.deprecation is not None:
            self.logger.warn(parsed.deprecation)
            response.deprecation = True
        return response

    def _serve(self, parsed: Parsed, started_ns: int) -> Response:
        try:
            data = self.vmm.handle(parsed.action, parsed.arg)
        except ActionError as err:
            reason = "Payload too large" if err.status == 413 else "Bad Request"
            self.logger.error(f"Received Error. Status code: {err.status} {reason}. "
                              f"Message: {err.message}")
            response = _fault(err.status, err.message)
            if isinstance(err, FatalActionError):
                response.after = self._fail_restore
            return response
        timed = TIMED_ACTIONS.get(parsed.action)
        if parsed.action == "CreateSnapshot":
            kind = parsed.arg["snapshot_type"].lower()
            timed = (f"{kind}_create_snapshot", f"create {kind} snapshot")
        if data is None:
            self.logger.info("The request was executed successfully. Status code: 204 No Content.")
            response = Response(204)
        else:
            self.logger.info("The request was executed successfully. Status code: 200 OK.")
            response = Response(200, dumps(data).encode())
        if timed is not None:
            took = max(1, (time.monotonic_ns() - started_ns) // 1000)
            self.metrics.set("latencies_us", timed[0], took)
            self.logger.info(f"'{timed[1]}' API request took {took} us.")
        return response

    def _fail_restore(self) -> None:
        self.logger.error("RunWithApiError error: Failed to build MicroVM: Loading snapshot "
                          "failed..", "main")
        print("Error: RunWithApi(BuildMicroVmError(Restore))", file=sys.stderr, flush=True)
        self.logger.error("Firecracker exiting with error. exit_code=1", "main")
        self.request_exit(1)

    # ---- routing ----
    def _parse(self, request: Request) -> Parsed:
        tokens = request.path.lstrip("/").split("/")
        if tokens[-1] == "":
            tokens.pop()  # Rust's split_terminator drops one trailing empty piece
        resource = tokens[0] if tokens else ""
        rest = iter(tokens[1:])
        method, body = request.method, request.body
        if method == "GET":
            if body is None:
                parsed = self._parse_get(resource, rest)
                if parsed is not None:
                    return parsed
            else:
                raise RequestError.generic("GET request cannot have a body.")
        elif method == "PUT":
            if body is None:
                raise RequestError.generic("Empty PUT request.")
            parsed = self._parse_put(resource, rest, body)
            if parsed is not None:
                return parsed
        else:
            if resource == "balloon":
                return self._parse_patch_balloon(rest, body)
            if body is None:
                raise RequestError.generic("Empty PATCH request.")
            parsed = self._parse_patch(resource, rest, body)
            if parsed is not None:
                return parsed
        raise RequestError.invalid_path(resource, method)

    def _parse_get(self, resource: str, rest: Iterator[str]) -> Parsed | None:
        counted = {"": "instance_info_count", "version": "vmm_version_count",
                   "machine-config": "machine_cfg_count", "mmds": "mmds_count"}
        if resource in counted:
            self.metrics.inc("get_api_requests", counted[resource])
        if resource == "":
            return Parsed("GetVmInstanceInfo")
        if resource == "balloon":
            return _parse_get_balloon(rest)
        if resource == "version":
            return Parsed("GetVmmVersion")
        if resource == "vm" and next(rest, None) == "config":
            return Parsed("GetFullVmConfig")
        if resource == "machine-config":
            return Parsed("GetVmMachineConfig")
        if resource == "mmds":
            return Parsed("GetMMDS")
        if resource == "hotplug" and next(rest, None) == "memory":
            self.metrics.inc("get_api_requests", "hotplug_memory_count")
            return Parsed("GetMemoryHotplugStatus")
        return None

    def _body(self, schema: Schema, body: bytes, counter: tuple[str, str] | None = None) -> Any:
        """Deserialize, counting `<name>_count` and `<name>_fails` like Firecracker."""
        if counter is not None:
            self.metrics.inc(counter[0], counter[1] + "_count")
        try:
            return from_slice(schema, body)
        except JsonError as err:
            if counter is not None:
                self.metrics.inc(counter[0], counter[1] + "_fails")
            raise RequestError.serde(err) from None

    def _checked_id(self, rest: Iterator[str], counter: tuple[str, str]) -> str:
        self.metrics.inc(counter[0], counter[1] + "_count")
        path_id = next(rest, None)
        if not path_id:
            self.metrics.inc(counter[0], counter[1] + "_fails")
            raise EMPTY_ID
        if not all(c == "_" or c.isalnum() for c in path_id):
            raise INVALID_ID
        return path_id

    def _parse_put(self, resource: str, rest: Iterator[str], body: bytes) -> Parsed | None:
        put = "put_api_requests"
        if resource == "actions":
            action = self._body(schemas.ACTION, body, (put, "actions"))["action_type"]
            return Parsed({"InstanceStart": "StartMicroVm"}.get(action, action))
        if resource == "balloon":
            return Parsed("SetBalloonDevice", self._body(schemas.BALLOON, body))
        if resource == "boot-source":
            return Parsed("ConfigureBootSource",
                          self._body(schemas.BOOT_SOURCE, body, (put, "boot_source")))
        if resource == "cpu-config":
            self._body(schemas.CPU_CONFIG, body, (put, "cpu_cfg"))
            return Parsed("PutCpuConfiguration")
        if resource == "drives":
            drive_id = self._checked_id(rest, (put, "drive"))
            cfg = self._body(schemas.DRIVE, body)
            _require_same_id(drive_id, cfg["drive_id"], self.metrics, (put, "drive_fails"))
            return Parsed("InsertBlockDevice", cfg)
        if resource == "pmem":
            pmem_id = self._checked_id(rest, (put, "pmem"))
            cfg = self._body(schemas.PMEM, body)
            _require_same_id(pmem_id, cfg["id"], self.metrics, (put, "pmem_fails"))
            return Parsed("InsertPmemDevice", cfg)
        if resource == "logger":
            return Parsed("ConfigureLogger", self._body(schemas.LOGGER, body, (put, "logger")))
        if resource == "serial":
            return Parsed("ConfigureSerial", self._body(schemas.SERIAL, body, (put, "serial")))
        if resource == "machine-config":
            return _machine_config(self._body(schemas.MACHINE_CONFIG, body, (put, "machine_cfg")),
                                   "PUT", self.metrics)
        if resource == "metrics":
            return Parsed("ConfigureMetrics",
                          self._body(schemas.METRICS, body, (put, "metrics")))
        if resource == "mmds":
            return self._parse_put_mmds(next(rest, None), body)
        if resource == "network-interfaces":
            iface_id = self._checked_id(rest, (put, "network"))
            cfg = self._body(schemas.NETWORK_INTERFACE, body)
            _require_same_iface(iface_id, cfg["iface_id"], self.metrics, (put, "network_fails"))
            return Parsed("InsertNetworkDevice", cfg)
        if resource == "snapshot":
            return self._parse_put_snapshot(next(rest, None), body)
        if resource == "vsock":
            cfg = self._body(schemas.VSOCK, body, (put, "vsock"))
            deprecation = None
            if cfg["vsock_id"] is not None:
                self.metrics.inc("deprecated_api", "deprecated_http_api_calls")
                deprecation = "PUT /vsock: vsock_id field is deprecated."
            return Parsed("SetVsockDevice", cfg, deprecation)
        if resource == "entropy":
            return Parsed("SetEntropyDevice", self._body(schemas.ENTROPY, body))
        if resource == "hotplug" and next(rest, None) == "memory":
            return Parsed("SetMemoryHotplugDevice",
                          self._body(schemas.MEMORY_HOTPLUG, body, (put, "hotplug_memory")))
        return None

    def _parse_put_mmds(self, sub: str | None, body: bytes) -> Parsed:
        self.metrics.inc("put_api_requests", "mmds_count")
        if sub is None:
            return Parsed("PutMMDS", self._body_or_fail(schemas.MMDS_DATA, body))
        if sub != "config":
            self.metrics.inc("put_api_requests", "mmds_fails")
            raise RequestError.generic(f"Unrecognized PUT request path `{sub}`.")
        cfg = self._body_or_fail(schemas.MMDS_CONFIG, body)
        deprecation = None
        if cfg["version"] == "V1":
            self.metrics.inc("deprecated_api", "deprecated_http_api_calls")
            deprecation = "PUT /mmds/config: V1 is deprecated. Use V2 instead."
        return Parsed("SetMmdsConfiguration", cfg, deprecation)

    def _body_or_fail(self, schema: Schema, body: bytes) -> Any:
        try:
            return from_slice(schema, body)
        except JsonError as err:
            self.metrics.inc("put_api_requests", "mmds_fails")
            raise RequestError.serde(err) from None

    def _parse_put_snapshot(self, operation: str | None, body: bytes) -> Parsed:
        if operation is None:
            raise RequestError.generic("Missing snapshot operation type.")
        if operation == "create":
            return Parsed("CreateSnapshot", self._body(schemas.SNAPSHOT_CREATE, body))
        if operation != "load":
            raise RequestError.invalid_path(f"/snapshot/{operation}", "PUT")
        cfg = self._body(schemas.SNAPSHOT_LOAD, body)
        backend, mem_file = cfg["mem_backend"], cfg["mem_file_path"]
        if backend is not None and mem_file is not None:
            raise RequestError.serde(JsonError(
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is "
                "required"))
        if backend is None and mem_file is None:
            raise RequestError.serde(JsonError(
                "missing field: either `mem_backend` or `mem_file_path` is required"))
        deprecation = None
        if mem_file is not None or cfg["enable_diff_snapshots"]:
            self.metrics.inc("deprecated_api", "deprecated_http_api_calls")
            deprecation = ("PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields "
                           "are deprecated.")
        params = {
            "snapshot_path": cfg["snapshot_path"],
            "mem_backend": backend or {"backend_path": mem_file, "backend_type": "File"},
            "track_dirty_pages": cfg["enable_diff_snapshots"] or cfg["track_dirty_pages"],
            "resume_vm": cfg["resume_vm"],
            "network_overrides": cfg["network_overrides"],
        }
        return Parsed("LoadSnapshot", params, deprecation)

    def _parse_patch(self, resource: str, rest: Iterator[str], body: bytes) -> Parsed | None:
        patch = "patch_api_requests"
        if resource == "drives":
            drive_id = self._checked_id(rest, (patch, "drive"))
            cfg = self._body(schemas.DRIVE_UPDATE, body)
            _require_same_id(drive_id, cfg["drive_id"], self.metrics, (patch, "drive_fails"))
            return Parsed("UpdateBlockDevice", cfg)
        if resource == "machine-config":
            update = self._body(schemas.MACHINE_CONFIG_UPDATE, body, (patch, "machine_cfg"))
            if all(v is None for v in update.values()):
                raise RequestError.generic("Empty PATCH request.")
            return _machine_config(update, "PATCH", self.metrics)
        if resource == "mmds":
            self.metrics.inc(patch, "mmds_count")
            try:
                return Parsed("PatchMMDS", from_slice(schemas.MMDS_DATA, body))
            except JsonError as err:
                self.metrics.inc(patch, "mmds_fails")
                raise RequestError.serde(err) from None
        if resource == "network-interfaces":
            iface_id = self._checked_id(rest, (patch, "network"))
            cfg = self._body(schemas.NETWORK_INTERFACE_UPDATE, body)
            _require_same_iface(iface_id, cfg["iface_id"], self.metrics, (patch, "network_count"))
            return Parsed("UpdateNetworkInterface", cfg)
        if resource == "vm":
            state = self._body(schemas.VM_STATE, body)["state"]
            return Parsed("Pause" if state == "Paused" else "Resume")
        if resource == "hotplug" and next(rest, None) == "memory":
            return Parsed("UpdateMemoryHotplugSize", self._body(
                schemas.MEMORY_HOTPLUG_UPDATE, body, (patch, "hotplug_memory")))
        return None

    def _parse_patch_balloon(self, rest: Iterator[str], body: bytes | None) -> Parsed:
        sub = next(rest, None)
        if sub == "statistics" and body is not None:
            return Parsed("UpdateBalloonStatistics",
                          self._body(schemas.BALLOON_STATS_UPDATE, body))
        if sub == "hinting":
            command = next(rest, None)
            if command == "start":
                cmd = self._body(schemas.BALLOON_HINTING_START, body) if body else {
                    "acknowledge_on_stop": True}
                return Parsed("StartFreePageHinting", cmd)
            if command == "stop":
                return Parsed("StopFreePageHinting")
            raise RequestError.generic(
                f"Unrecognized PATCH request path `/hinting/{command or ''}`.")
        if body is None:
            raise RequestError.generic("Empty PATCH request.")
        return Parsed("UpdateBalloon", self._body(schemas.BALLOON_UPDATE, body))


def _parse_get_balloon(rest: Iterator[str]) -> Parsed:
    sub = next(rest, None)
    if sub is None:
        return Parsed("GetBalloonConfig")
    if sub == "statistics":
        return Parsed("GetBalloonStats")
    if sub == "hinting":
        command = next(rest, None)
        if command == "status":
            return Parsed("GetFreePageHintingStatus")
        raise RequestError.generic(f"Unrecognized GET request path `/hinting/{command or ''}`.")
    raise RequestError.generic(f"Unrecognized GET request path `{sub}`.")


def _machine_config(cfg: dict[str, Any], method: str, metrics: Metrics) -> Parsed:
    deprecation = None
    if cfg["cpu_template"] is not None:
        metrics.inc("deprecated_api", "deprecated_http_api_calls")
        deprecation = f"{method} /machine-config: cpu_template field is deprecated."
    return Parsed("UpdateMachineConfiguration", cfg, deprecation)


def _require_same_id(path_id: str, body_id: str, metrics: Metrics,
                     counter: tuple[str, str]) -> None:
    if path_id != body_id:
        metrics.inc(*counter)
        raise RequestError.generic("The id from the path does not match the id from the body!")


def _require_same_iface(path_id: str, body_id: str, metrics: Metrics,
                        counter: tuple[str, str]) -> None:
    if path_id != body_id:
        metrics.inc(*counter)
        raise RequestError.generic(f"The id from the path [{path_id}] does not match the id "
                                   f"from the body [{body_id}]!")


def _describe(request: Request) -> str:
    head = f"{METHOD_NAMES[request.method]} request on {rust_debug_str(request.path)}"
    if request.body is None or request.path == "/mmds":
        return head
    if request.path == "/cpu-config":
        return (head + ". To view the CPU template received by the API, configure log-level "
                "to DEBUG")
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        text = "inconvertible to UTF-8"
    return f"{head} with body {rust_debug_str(text)}"


def _fault(status: int, message: str) -> Response:
    return Response(status, dumps({"fault_message": message}).encode())
