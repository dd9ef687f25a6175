"""The API routes (vmm/src/api/http/mod.rs and http_endpoint.rs): methods, bodies, replies."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tools.simulators.cloud_hypervisor.config import (
    DISK,
    NET,
    REMOVE_DEVICE_DATA,
    RESIZE_DATA,
    VM_CONFIG,
)
from tools.simulators.cloud_hypervisor.errors import ApiFailure, api_error
from tools.simulators.cloud_hypervisor.serde import Kind, deserialize
from tools.simulators.cloud_hypervisor.vmm import Vmm

API_ROOT = "/api/v1"


@dataclass(frozen=True)
class Route:
    """How one endpoint handles methods and bodies, and what it calls."""

    # "action": PUT, no body; "body": PUT with a JSON body; "get": GET only;
    # "create"/"info"/"ping"/"vmm_shutdown": the endpoints with their own handlers.
    style: str
    call: Callable[[Vmm, Any], Any]
    schema: Kind | None = None


def _not_simulated(action: str) -> Callable[[Vmm, Any], Any]:
    def call(vmm: Vmm, body: Any) -> Any:
        raise api_error(action, "not implemented by the Cloud Hypervisor API simulator")
    return call


ROUTES: dict[str, Route] = {
    "/vm.create": Route("create", lambda vmm, body: vmm.vm_create(body), VM_CONFIG),
    "/vm.boot": Route("action", lambda vmm, _: vmm.vm_boot()),
    "/vm.pause": Route("action", lambda vmm, _: vmm.vm_pause()),
    "/vm.resume": Route("action", lambda vmm, _: vmm.vm_resume()),
    "/vm.shutdown": Route("action", lambda vmm, _: vmm.vm_shutdown()),
    "/vm.reboot": Route("action", lambda vmm, _: vmm.vm_reboot()),
    "/vm.delete": Route("action", lambda vmm, _: vmm.vm_delete()),
    "/vm.power-button": Route("action", lambda vmm, _: vmm.vm_power_button()),
    "/vm.nmi": Route("action", lambda vmm, _: vmm.vm_nmi()),
    "/vm.info": Route("info", lambda vmm, _: vmm.vm_info()),
    "/vm.counters": Route("get", lambda vmm, _: vmm.vm_counters()),
    "/vmm.ping": Route("ping", lambda vmm, _: vmm.vmm_ping()),
    "/vmm.shutdown": Route("vmm_shutdown", lambda vmm, _: vmm.vmm_shutdown()),
    "/vm.resize": Route("body", lambda vmm, body: vmm.vm_resize(body), RESIZE_DATA),
    "/vm.add-disk": Route("body", lambda vmm, body: vmm.vm_add_disk(body), DISK),
    "/vm.add-net": Route("body", lambda vmm, body: vmm.vm_add_net(body), NET),
    "/vm.remove-device": Route("body", lambda vmm, body: vmm.vm_remove_device(body["id"]),
                               REMOVE_DEVICE_DATA),
    "/vm.add-device": Route("body", _not_simulated("The device could not be added to the VM")),
    "/vm.add-user-device": Route(
        "body", _not_simulated("The user device could not be added to the VM")),
    "/vm.add-fs": Route("body", _not_simulated("The fs could not be added to the VM")),
    "/vm.add-generic-vhost-user": Route("body", _not_simulated(
        "The generic vhost-user device could not be added to the VM")),
    "/vm.add-pmem": Route("body", _not_simulated("The pmem device could not be added to the VM")),
    "/vm.add-vdpa": Route("body", _not_simulated("The vDPA device could not be added to the VM")),
    "/vm.add-vsock": Route("body",
                           _not_simulated("The vsock device could not be added to the VM")),
    "/vm.resize-disk": Route("body", _not_simulated("The disk could not be resized")),
    "/vm.resize-zone": Route("body", _not_simulated("The memory zone could not be resized")),
    "/vm.snapshot": Route("body", _not_simulated("The VM could not be snapshotted")),
    "/vm.restore": Route("body", _not_simulated("The VM could not be restored")),
    "/vm.send-migration": Route("body",
                                _not_simulated("Error dispatching the migration worker")),
    "/vm.receive-migration": Route("body", _not_simulated("Error receiving migration")),
}


def to_json(value: Any) -> str:
    """Compact, as serde_json::to_string writes it."""
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class Reply:
    status: int
    body: str | None = None  # None: no body at all


def _error_reply(e: ApiFailure) -> Reply:
    return Reply(e.status, to_json(e.chain))


BAD_REQUEST = ApiFailure(400, ["Bad Request"])


def handle(vmm: Vmm, method: str, path: str, raw_body: bytes | None) -> Reply:
    """One request, as Cloud Hypervisor's HTTP thread and VMM thread answer it."""
    route = ROUTES.get(path[len(API_ROOT):]) if path.startswith(API_ROOT + "/") else None
    if route is None:
        return _error_reply(ApiFailure(404, ["Not Found"]))
    try:
        with vmm.lock:
            return _dispatch(vmm, route, method, raw_body)
    except ApiFailure as e:
        return _error_reply(e)
    except Exception:  # a simulator bug must not kill the connection silently
        return _error_reply(ApiFailure(500, ["Internal Server Error"]))


def _dispatch(vmm: Vmm, route: Route, method: str, raw_body: bytes | None) -> Reply:
    if route.style in ("info", "ping", "get"):
        if method != "GET":
            # The generic handler answers an empty 400 for methods other than GET/PUT.
            if route.style == "get" and method != "PUT":
                return Reply(400)
            raise BAD_REQUEST
        return Reply(200, to_json(route.call(vmm, None)))
    if route.style in ("create", "vmm_shutdown"):
        if method != "PUT":
            raise BAD_REQUEST
        if route.style == "vmm_shutdown":
            route.call(vmm, None)
            return Reply(200, "")
        if raw_body is None:
            return Reply(400)
        assert route.schema is not None
        route.call(vmm, deserialize(raw_body, route.schema))
        return Reply(204)
    if method == "GET":
        raise BAD_REQUEST
    if method != "PUT":
        return Reply(400)
    if route.style == "action":
        if raw_body is not None:
            raise BAD_REQUEST
        route.call(vmm, None)
        return Reply(204)
    if raw_body is None:
        raise BAD_REQUEST
    body = deserialize(raw_body, route.schema) if route.schema is not None else None
    result = route.call(vmm, body)
    return Reply(204) if result is None else Reply(200, to_json(result))
