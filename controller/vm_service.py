"""vmm.v1.VmService: validate, record desired state in etcd, wait for the agent's report."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from controller import scheduler, validation
from controller.agent_hub import AgentHub, AgentSession
from controller.errors import (
    ApiError,
    Violation,
    code_from_name,
    failed_precondition,
    invalid,
    invalid_field,
    not_found,
)
from controller.etcd import EtcdUnavailable
from controller.fleet import Fleet
from controller.store import ConflictError, CreateOutcome, Store, StoredVm, now
from controller.telemetry import Telemetry
from controller.vm_cache import VmCache
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2, vm_pb2_grpc

log = logging.getLogger(__name__)
S = vm_pb2.VmState
T = TypeVar("T")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
PLACEMENT_ATTEMPTS = 20


@dataclass(frozen=True)
class VmServiceSettings:
    # How long an RPC waits for the agent to carry out a change.
    operation_timeout: float = 30.0
    # Reserve max_vcpu_count / max_size_bytes for hotplug-ready VMs (else boot size).
    reserve_hotplug_maximum: bool = True
    # Backend order when density ties and the request names none.
    backend_preference: tuple[str, ...] = (features.FIRECRACKER, features.CLOUD_HYPERVISOR,
                                           features.QEMU)
    # Seconds added to a shutdown's own timeout before the RPC gives up waiting.
    shutdown_grace: float = 15.0


def api_method(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn the project's exceptions into gRPC statuses; never INTERNAL for a user's mistake."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await handler(self, request, context)
        except ApiError as err:
            await context.abort_with_status(err.to_status())
        except EtcdUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable: {err}")
        except ConflictError as err:
            await context.abort(grpc.StatusCode.ABORTED, str(err))
        raise AssertionError("unreachable")

    return wrapper


def state_name(state: int) -> str:
    return vm_pb2.VmState.Name(state).removeprefix("VM_STATE_")  # type: ignore[arg-type]


Device = TypeVar("Device", vm_pb2.StorageDevice, vm_pb2.NetworkInterface)


def check_new_device(check: Callable[[list[Device], str], list[Violation]],
                     existing: Sequence[Device], device: Device, list_path: str, field: str,
                     noun: str) -> None:
    """Validate a device to hot-add as if it were appended to the VM's config at list_path
    (ids stay unique, one root disk), naming the request's own field in errors."""
    prefix = f"{list_path}[{len(existing)}]"
    devices = list(existing)
    devices.append(device)
    violations = [Violation(v.field.replace(prefix, field), v.description)
                  for v in check(devices, list_path) if v.field.startswith(prefix)]
    if not device.id:
        violations.append(Violation(f"{field}.id", f"is required to detach the {noun} later"))
    if violations:
        raise invalid(violations)


def remove_by_id(devices: Any, device_id: str) -> None:
    """Drop the device with this id from a repeated field, keeping the others' order."""
    keep = [d for d in devices if d.id != device_id]
    del devices[:]
    devices.extend(keep)


def new_vm_id() -> str:
    # 96 random bits; the create transaction's create_revision == 0 guard makes a
    # collision an ALREADY_EXISTS retry rather than an overwrite.
    return f"vm-{uuid.uuid4().hex[:24]}"


class VmService(vm_pb2_grpc.VmServiceServicer):
    def __init__(self, store: Store, cache: VmCache, hub: AgentHub, fleet: Fleet,
                 telemetry: Telemetry, settings: VmServiceSettings | None = None) -> None:
        self.store = store
        self.cache = cache
        self.hub = hub
        self.fleet = fleet
        self.telemetry = telemetry
        self.settings = settings or VmServiceSettings()
        self._placement_lock = asyncio.Lock()

    # ---- create -----------------------------------------------------------------------

    @api_method
    async def CreateVm(self, request: vm_pb2.CreateVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.CreateVmResponse:
        violations = validation.check_vm_id(request.vm_id) if request.vm_id else []
        if not request.HasField("config"):
            violations.append(Violation("config", "is required"))
        else:
            violations += validation.check_config(request.config)
        if request.backend and request.backend not in features.BACKENDS:
            violations.append(Violation(
                "backend", f"{request.backend!r} is not one of {', '.join(features.BACKENDS)}"))
        if violations:
            raise invalid(violations)
        vm_id = request.vm_id or new_vm_id()
        if self.cache.get(vm_id) or await self.store.get_vm(vm_id):
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"vm {vm_id!r} already exists")

        stored = await self._place_and_store(vm_id, request)
        record = stored.record
        result = await self._await_generation(record, self.settings.operation_timeout)
        if result is not None and result.record.status.error \
                and result.record.status.observed_generation == record.generation:
            # The hypervisor refused what validation let through: undo the create.
            status = result.record.status
            await self.store.delete_vm(vm_id)
            raise ApiError(code_from_name(status.error_code or "FAILED_PRECONDITION"),
                           f"creating vm {vm_id} on host {record.host_id} failed: {status.error}")
        final = result.record if result else record
        return vm_pb2.CreateVmResponse(
            vm_id=vm_id, state=final.status.state, warnings=record.warnings,
            placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                       simulated=record.simulated))

    async def _place_and_store(self, vm_id: str, request: vm_pb2.CreateVmRequest) -> StoredVm:
        # One placement at a time per controller: concurrent creates would otherwise all
        # pick the same densest host and retry each other's conflicts. The transaction's
        # revision compare still guards against other controller replicas.
        async with self._placement_lock:
            return await self._place_and_store_locked(vm_id, request)

    async def _place_and_store_locked(self, vm_id: str,
                                      request: vm_pb2.CreateVmRequest) -> StoredVm:
        config = request.config
        for _attempt in range(PLACEMENT_ATTEMPTS):
            hosts = await self.fleet.host_views()
            demand_of = self._demands(config, hosts)
            choice = scheduler.place(config, hosts, backend=request.backend,
                                     host_id=request.host_id,
                                     preference=self.settings.backend_preference,
                                     demand_of=demand_of)
            if isinstance(choice, scheduler.NoPlacement):
                raise self._no_placement(request, choice, hosts, demand_of)
            await self._preflight(choice, vm_id, config)
            backend = choice.backend.name
            demand = demand_of.get(backend) or scheduler.demand_for(config, False)
            alloc = await self.store.get_allocation(choice.host.host_id)
            if alloc.revision != choice.host.allocation_revision:
                self.telemetry.placement_conflicts.add(1)
                continue
            new_alloc = records_pb2.Allocation(
                allocated=host_pb2.Resources(
                    vcpus=alloc.allocation.allocated.vcpus + demand.vcpus,
                    memory_bytes=alloc.allocation.allocated.memory_bytes + demand.memory),
                vm_count=alloc.allocation.vm_count + 1)
            ts = now()
            record = records_pb2.VmRecord(
                vm_id=vm_id, config=config, backend=backend, host_id=choice.host.host_id,
                generation=1, desired_state=S.VM_STATE_CREATED, simulated=choice.backend.simulated,
                reserved=host_pb2.Resources(vcpus=demand.vcpus, memory_bytes=demand.memory),
                created_timestamp=ts, modified_timestamp=ts, warnings=choice.fit.warnings)
            outcome = await self.store.create_vm(record, alloc, new_alloc)
            if outcome is CreateOutcome.EXISTS:
                raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"vm {vm_id!r} already exists")
            if outcome is CreateOutcome.ALLOCATION_CHANGED:
                self.telemetry.placement_conflicts.add(1)
                continue
            self.telemetry.placed(record.host_id, backend)
            stored = await self.store.get_vm(vm_id)
            if stored is None:  # deleted in between by someone else
                raise not_found(vm_id)
            self.cache.note_write(stored)
            log.info("vm %s placed on host %s (%s)", vm_id, record.host_id, backend)
            return stored
        raise ApiError(grpc.StatusCode.ABORTED,
                       "placement kept racing concurrent creates; try again")

    def _demands(self, config: vm_pb2.VmConfig,
                 hosts: list[scheduler.HostView]) -> dict[str, scheduler.Demand]:
        """Per backend, what the VM would hold: a backend that ignores max_vcpu_count does not
        reserve it."""
        out: dict[str, scheduler.Demand] = {}
        for host in hosts:
            for name, backend in host.backends.items():
                if name in out:
                    continue
                honours_max = features.support_of(
                    backend.capabilities, "cpu.max_vcpu_count").support == host_pb2.SUPPORT_FULL
                out[name] = scheduler.demand_for(
                    config, self.settings.reserve_hotplug_maximum and honours_max)
        return out

    def _no_placement(self, request: vm_pb2.CreateVmRequest, why: scheduler.NoPlacement,
                      hosts: list[scheduler.HostView],
                      demand_of: dict[str, scheduler.Demand]) -> ApiError:
        wanted = request.backend or "any backend"
        if request.host_id and not any(h.host_id == request.host_id and h.ready for h in hosts):
            return failed_precondition(f"host {request.host_id!r} is not connected")
        if not why.offered_backends:
            if request.backend:
                return ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no connected host offers backend {request.backend!r}")
            return ApiError(grpc.StatusCode.UNAVAILABLE,
                            "no host is ready (connected and heartbeating)")
        if why.backend_violations:
            violations = [v for name in sorted(why.backend_violations)
                          for v in why.backend_violations[name]]
            return invalid(violations)
        best = scheduler.best_free(why.full_hosts)
        need = demand_of.get(request.backend) or scheduler.demand_for(request.config, False)
        free = (f"; the host with most room, {best.host_id}, has {best.free_vcpus} vCPUs and "
                f"{validation.human_bytes(max(best.free_memory, 0))} free") if best else ""
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"no host has room for {need.describe()} on {wanted}{free}")

    async def _preflight(self, choice: scheduler.Choice, vm_id: str,
                         config: vm_pb2.VmConfig) -> None:
        session = self.hub.host_of(choice.host.host_id)
        if session is None:
            return  # connected to another controller replica; the agent checks again at create
        reply = await self._call(session, agent_pb2.Request(preflight=agent_pb2.PreflightRequest(
            vm_id=vm_id, config=config, backend=choice.backend.name)))
        if reply.violations:
            raise invalid([Violation(v.field, v.description) for v in reply.violations])
        if reply.error:
            raise ApiError(code_from_name(reply.error_code), reply.error)

    async def _call(self, session: AgentSession, request: agent_pb2.Request) -> agent_pb2.Reply:
        kind = request.WhichOneof("kind")
        try:
            with self.telemetry.tracer.start_as_current_span(f"agent.{kind}") as span:
                span.set_attribute("vmm.host_id", session.host_id)
                return await session.call(request, self.settings.operation_timeout)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"host {session.host_id} did not answer within "
                           f"{self.settings.operation_timeout:.0f}s") from None

    # ---- waiting for the agent ------------------------------------------------------

    async def _await_generation(self, record: records_pb2.VmRecord,
                                timeout: float) -> StoredVm | None:
        """Wait until the VM's agent reports the record's generation (or the VM is gone).
        The wait is the agent's operation as the controller sees it: it gets its own span."""
        generation = record.generation
        with self.telemetry.tracer.start_as_current_span("agent.apply") as span:
            span.set_attribute("vmm.vm_id", record.vm_id)
            span.set_attribute("vmm.host_id", record.host_id)
            span.set_attribute("vmm.generation", generation)
            span.set_attribute("vmm.desired_state", state_name(record.desired_state))
            try:
                return await self.cache.wait_for(
                    record.vm_id,
                    lambda s: s is None or s.record.status.observed_generation >= generation,
                    timeout)
            except TimeoutError:
                span.set_attribute("vmm.timed_out", True)
        raise ApiError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"vm {record.vm_id}: the desired state (generation {generation}) is recorded, but "
            f"host {record.host_id} has not reported it within {timeout:.0f}s; it will be "
            "applied when the host catches up")

    # ---- lifecycle ------------------------------------------------------------------

    def _get(self, vm_id: str) -> StoredVm:
        if not vm_id:
            raise invalid_field("vm_id", "is required")
        stored = self.cache.get(vm_id)
        if stored is None:
            raise not_found(vm_id)
        return stored

    def current_state(self, record: records_pb2.VmRecord) -> vm_pb2.VmState.ValueType:
        if not self.fleet.host_connected(record.host_id):
            return S.VM_STATE_UNKNOWN
        return record.status.state

    async def _transition(self, vm_id: str, verb: str, allowed: set[int], target: int,
                          feature_key: str, edit: Callable[[records_pb2.VmRecord], None] | None
                          = None, timeout: float | None = None) -> vm_pb2.VmState.ValueType:
        stored = self._get(vm_id)
        record = stored.record
        if record.deleting:
            raise failed_precondition(f"cannot {verb} vm {vm_id}: it is being deleted")
        if not self.fleet.host_connected(record.host_id):
            await self.fleet.refresh_alive()  # its agent may be on another replica
        state = self.current_state(record)
        if state == S.VM_STATE_UNKNOWN:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"cannot {verb} vm {vm_id}: its host {record.host_id} is not connected")
        if state not in allowed:
            raise failed_precondition(f"cannot {verb} vm {vm_id}: it is {state_name(state)}")
        caps = await self.fleet.capabilities(record.host_id, record.backend)
        if caps is not None and (msg := validation.required_feature(caps, feature_key)):
            raise failed_precondition(msg)
        before = record.status.state

        def change(r: records_pb2.VmRecord) -> None:
            r.desired_state = target  # type: ignore[assignment]
            r.generation += 1
            if edit:
                edit(r)

        written = await self.store.mutate_vm(vm_id, change)
        if written is None:
            raise not_found(vm_id)
        self.cache.note_write(written)
        result = await self._await_generation(written.record,
                                              timeout or self.settings.operation_timeout)
        if result is None:
            raise not_found(vm_id)
        status = result.record.status
        if status.error and status.observed_generation == written.record.generation:
            if status.state != S.VM_STATE_FAILED:
                # Make desired match what runs again; a FAILED VM keeps its failed
                # generation, which the agent leaves alone until the next request.
                await self._roll_back(vm_id, written.record.generation, before)
            raise ApiError(code_from_name(status.error_code or "FAILED_PRECONDITION"),
                           f"{verb} vm {vm_id} failed: {status.error}")
        return status.state

    async def _roll_back(self, vm_id: str, generation: int, state: int) -> None:
        """After a failed operation, make desired match what runs again."""

        def change(r: records_pb2.VmRecord) -> bool:
            if r.generation != generation:
                return False
            r.desired_state = r.status.state or state  # type: ignore[assignment]
            r.generation += 1
            return True

        written = await self.store.mutate_vm(vm_id, change)
        if written is not None:
            self.cache.note_write(written)

    @api_method
    async def BootVm(self, request: vm_pb2.BootVmRequest,
                     context: grpc.aio.ServicerContext) -> vm_pb2.BootVmResponse:
        state = await self._transition(
            request.vm_id, "boot", {S.VM_STATE_CREATED, S.VM_STATE_SHUTDOWN, S.VM_STATE_FAILED},
            S.VM_STATE_RUNNING, "vm.boot")
        return vm_pb2.BootVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    async def PauseVm(self, request: vm_pb2.PauseVmRequest,
                      context: grpc.aio.ServicerContext) -> vm_pb2.PauseVmResponse:
        state = await self._transition(request.vm_id, "pause", {S.VM_STATE_RUNNING},
                                       S.VM_STATE_PAUSED, "vm.pause_resume")
        return vm_pb2.PauseVmResponse(success=state == S.VM_STATE_PAUSED, state=state)

    @api_method
    async def ResumeVm(self, request: vm_pb2.ResumeVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.ResumeVmResponse:
        state = await self._transition(request.vm_id, "resume", {S.VM_STATE_PAUSED},
                                       S.VM_STATE_RUNNING, "vm.pause_resume")
        return vm_pb2.ResumeVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    async def ShutdownVm(self, request: vm_pb2.ShutdownVmRequest,
                         context: grpc.aio.ServicerContext) -> vm_pb2.ShutdownVmResponse:
        if request.timeout_seconds < 0:
            raise invalid_field("timeout_seconds", f"must not be negative, got "
                                f"{request.timeout_seconds}")

        def policy(r: records_pb2.VmRecord) -> None:
            r.shutdown.force = request.force
            r.shutdown.timeout_seconds = request.timeout_seconds

        wait = request.timeout_seconds + self.settings.shutdown_grace
        state = await self._transition(
            request.vm_id, "shut down",
            {S.VM_STATE_RUNNING, S.VM_STATE_PAUSED, S.VM_STATE_CREATED, S.VM_STATE_FAILED},
            S.VM_STATE_SHUTDOWN, "vm.shutdown", policy,
            timeout=max(wait, self.settings.operation_timeout))
        return vm_pb2.ShutdownVmResponse(success=state == S.VM_STATE_SHUTDOWN, state=state)

    @api_method
    async def RebootVm(self, request: vm_pb2.RebootVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.RebootVmResponse:
        def bump(r: records_pb2.VmRecord) -> None:
            r.reboot_epoch += 1
            r.force_reboot = request.force

        state = await self._transition(request.vm_id, "reboot", {S.VM_STATE_RUNNING},
                                       S.VM_STATE_RUNNING, "vm.reboot", bump,
                                       timeout=self.settings.operation_timeout
                                       + self.settings.shutdown_grace)
        return vm_pb2.RebootVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    async def DeleteVm(self, request: vm_pb2.DeleteVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.DeleteVmResponse:
        stored = self._get(request.vm_id)
        record = stored.record
        if not self.fleet.host_connected(record.host_id):
            await self.fleet.refresh_alive()  # its agent may be on another replica
        state = self.current_state(record)
        if state in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED) and not request.force:
            raise failed_precondition(
                f"cannot delete vm {record.vm_id}: it is {state_name(state)}; shut it down first "
                "or delete with force")
        if state == S.VM_STATE_UNKNOWN:
            if not request.force:
                raise failed_precondition(
                    f"cannot delete vm {record.vm_id}: its host {record.host_id} is not "
                    "connected; delete with force to forget it (the agent removes it when it "
                    "reconnects)")
            await self.store.delete_vm(record.vm_id)
            return vm_pb2.DeleteVmResponse(success=True)

        def mark(r: records_pb2.VmRecord) -> None:
            r.deleting = True
            r.force_delete = request.force
            r.generation += 1

        written = await self.store.mutate_vm(record.vm_id, mark)
        if written is None:
            raise not_found(record.vm_id)
        self.cache.note_write(written)
        try:
            wait = self.settings.operation_timeout + self.settings.shutdown_grace
            await self.cache.wait_for(record.vm_id, lambda s: s is None, wait)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"vm {record.vm_id} is marked for deletion, but host {record.host_id} "
                           "has not confirmed its removal yet") from None
        return vm_pb2.DeleteVmResponse(success=True)

    # ---- reads ----------------------------------------------------------------------

    def vm_info(self, record: records_pb2.VmRecord) -> vm_pb2.VmInfo:
        return vm_pb2.VmInfo(
            vm_id=record.vm_id, state=self.current_state(record),
            vcpu_count=record.config.cpu.vcpu_count,
            memory_size_bytes=record.config.memory.size_bytes,
            created_timestamp=record.created_timestamp,
            modified_timestamp=record.modified_timestamp, metadata=record.config.metadata,
            placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                       simulated=record.simulated),
            state_reason=self._reason(record))

    def _reason(self, record: records_pb2.VmRecord) -> str:
        if not self.fleet.host_connected(record.host_id):
            return f"host {record.host_id} is not connected"
        return record.status.reason or record.status.error

    @api_method
    async def GetVmInfo(self, request: vm_pb2.GetVmInfoRequest,
                        context: grpc.aio.ServicerContext) -> vm_pb2.GetVmInfoResponse:
        record = self._get(request.vm_id).record
        session = self.hub.host_of(record.host_id)
        metrics = session.vm_metrics.get(record.vm_id) if session else None
        return vm_pb2.GetVmInfoResponse(
            vm_id=record.vm_id, config=record.config, state=self.current_state(record),
            metrics=metrics or vm_pb2.VmMetrics(), backend_info=record.status.backend_info,
            placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                       simulated=record.simulated),
            state_reason=self._reason(record), desired_state=record.desired_state,
            generation=record.generation, observed_generation=record.status.observed_generation,
            created_timestamp=record.created_timestamp,
            modified_timestamp=record.modified_timestamp)

    @api_method
    async def ListVms(self, request: vm_pb2.ListVmsRequest,
                      context: grpc.aio.ServicerContext) -> vm_pb2.ListVmsResponse:
        if request.page_size < 0:
            raise invalid_field("page_size", f"must not be negative, got {request.page_size}")
        after = ""
        if request.page_token:
            try:
                after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                raise invalid_field("page_token", "is not a token this API issued") from None
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        wanted = set(request.state_filter)
        infos = [self.vm_info(s.record) for _, s in sorted(self.cache.vms.items())
                 if not s.record.deleting]
        if wanted:
            infos = [i for i in infos if i.state in wanted]
        page = [i for i in infos if i.vm_id > after][:size]
        more = len(page) == size and any(i.vm_id > page[-1].vm_id for i in infos)
        token = base64.urlsafe_b64encode(page[-1].vm_id.encode()).decode() if more else ""
        return vm_pb2.ListVmsResponse(vms=page, next_page_token=token, total_count=len(infos))

    async def WatchVms(self, request: vm_pb2.WatchVmsRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[vm_pb2.WatchVmsResponse]:
        ids, states = set(request.vm_ids), set(request.state_filter)

        def wanted(info: vm_pb2.VmInfo) -> bool:
            return (not ids or info.vm_id in ids) and (not states or info.state in states)

        async with self.cache.subscribe() as changes:
            for _, stored in sorted(self.cache.vms.items()):
                info = self.vm_info(stored.record)
                if wanted(info):
                    yield vm_pb2.WatchVmsResponse(type=vm_pb2.VM_EVENT_TYPE_EXISTING, vm=info,
                                                  revision=stored.revision)
            while True:
                change = await changes.get()
                if change.current is None:
                    if change.previous is None:
                        continue
                    info = self.vm_info(change.previous.record)
                    kind = vm_pb2.VM_EVENT_TYPE_DELETED
                else:
                    info = self.vm_info(change.current.record)
                    kind = (vm_pb2.VM_EVENT_TYPE_CREATED if change.previous is None
                            else vm_pb2.VM_EVENT_TYPE_UPDATED)
                if wanted(info) or (ids and info.vm_id in ids):
                    yield vm_pb2.WatchVmsResponse(type=kind, vm=info, revision=change.revision)

    # ---- hotplug ----------------------------------------------------------------------

    async def _hotplug(self, vm_id: str, feature_key: str,
                       request: agent_pb2.HotplugRequest,
                       update: Callable[[records_pb2.VmRecord], None]) -> vm_pb2.VmState.ValueType:
        stored = self._get(vm_id)
        record = stored.record
        caps = await self.fleet.capabilities(record.host_id, record.backend)
        if caps is not None and (msg := validation.required_feature(caps, feature_key)):
            raise failed_precondition(msg)
        state = self.current_state(record)
        if state not in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED):
            raise failed_precondition(f"cannot change vm {vm_id} while it is {state_name(state)}; "
                                      "hotplug needs a running VM")
        session = self.hub.host_of(record.host_id)
        if session is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"host {record.host_id} of vm {vm_id} is not connected here")
        request.vm_id = vm_id
        reply = await self._call(session, agent_pb2.Request(hotplug=request))
        if reply.violations:
            raise invalid([Violation(v.field, v.description) for v in reply.violations])
        if reply.error:
            raise ApiError(code_from_name(reply.error_code), reply.error)

        def follow(r: records_pb2.VmRecord) -> None:
            # The desired config follows the change so that a restart recreates the VM as it
            # is now. The generation is not bumped: the agent already runs this config.
            if reply.hotplug.HasField("config"):
                r.config.CopyFrom(reply.hotplug.config)
            else:
                update(r)

        written = await self.store.mutate_vm(vm_id, follow)
        if written is not None:
            self.cache.note_write(written)
        return reply.hotplug.state or state

    @api_method
    async def ResizeVm(self, request: vm_pb2.ResizeVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.ResizeVmResponse:
        record = self._get(request.vm_id).record
        violations = []
        if request.vcpu_count < 0:
            violations.append(Violation("vcpu_count", "must not be negative"))
        if request.memory_size_bytes < 0:
            violations.append(Violation("memory_size_bytes", "must not be negative"))
        elif request.memory_size_bytes % validation.MIB:
            violations.append(Violation("memory_size_bytes", "is not a whole number of MiB"))
        if not request.vcpu_count and not request.memory_size_bytes:
            violations.append(Violation("vcpu_count", "give vcpu_count, memory_size_bytes or both"))
        if violations:
            raise invalid(violations)
        key = "cpu.hotplug" if request.vcpu_count else "memory.hotplug"
        caps = await self.fleet.capabilities(record.host_id, record.backend)
        if caps is not None:
            for needed, asked in (("cpu.hotplug", request.vcpu_count),
                                  ("memory.hotplug", request.memory_size_bytes)):
                if asked and (msg := validation.required_feature(caps, needed)):
                    raise failed_precondition(msg)
        cpu_max = record.config.cpu.max_vcpu_count or record.config.cpu.vcpu_count
        if request.vcpu_count > cpu_max:
            raise invalid_field("vcpu_count", f"{request.vcpu_count} exceeds the VM's "
                                f"max_vcpu_count of {cpu_max}")
        mem_max = record.config.memory.max_size_bytes or record.config.memory.size_bytes
        if request.memory_size_bytes > mem_max:
            raise invalid_field("memory_size_bytes", f"{request.memory_size_bytes} exceeds the "
                                f"VM's max_size_bytes of {mem_max}")

        def update(r: records_pb2.VmRecord) -> None:
            if request.vcpu_count:
                r.config.cpu.vcpu_count = request.vcpu_count
            if request.memory_size_bytes:
                r.config.memory.size_bytes = request.memory_size_bytes

        state = await self._hotplug(request.vm_id, key,
                                    agent_pb2.HotplugRequest(resize=request), update)
        now_cfg = self._get(request.vm_id).record.config
        return vm_pb2.ResizeVmResponse(success=True, state=state,
                                       vcpu_count=now_cfg.cpu.vcpu_count,
                                       memory_size_bytes=now_cfg.memory.size_bytes)

    @api_method
    async def AttachDisk(self, request: vm_pb2.AttachDiskRequest,
                         context: grpc.aio.ServicerContext) -> vm_pb2.AttachDiskResponse:
        record = self._get(request.vm_id).record
        check_new_device(validation.check_storage, record.config.storage, request.device,
                         "config.storage", "device", "disk")

        def update(r: records_pb2.VmRecord) -> None:
            r.config.storage.append(request.device)

        state = await self._hotplug(request.vm_id, "storage.hotplug",
                                    agent_pb2.HotplugRequest(attach_disk=request.device), update)
        return vm_pb2.AttachDiskResponse(success=True, state=state)

    @api_method
    async def DetachDisk(self, request: vm_pb2.DetachDiskRequest,
                         context: grpc.aio.ServicerContext) -> vm_pb2.DetachDiskResponse:
        record = self._get(request.vm_id).record
        if not any(d.id == request.device_id for d in record.config.storage):
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"vm {request.vm_id} has no disk {request.device_id!r}")

        def update(r: records_pb2.VmRecord) -> None:
            remove_by_id(r.config.storage, request.device_id)

        state = await self._hotplug(request.vm_id, "storage.hotplug",
                                    agent_pb2.HotplugRequest(detach_disk=request.device_id), update)
        return vm_pb2.DetachDiskResponse(success=True, state=state)

    @api_method
    async def AttachNetworkInterface(self, request: vm_pb2.AttachNetworkInterfaceRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> vm_pb2.AttachNetworkInterfaceResponse:
        record = self._get(request.vm_id).record
        check_new_device(validation.check_network, record.config.network, request.interface,
                         "config.network", "interface", "interface")

        def update(r: records_pb2.VmRecord) -> None:
            r.config.network.append(request.interface)

        state = await self._hotplug(request.vm_id, "network.hotplug",
                                    agent_pb2.HotplugRequest(attach_nic=request.interface), update)
        return vm_pb2.AttachNetworkInterfaceResponse(success=True, state=state)

    @api_method
    async def DetachNetworkInterface(self, request: vm_pb2.DetachNetworkInterfaceRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> vm_pb2.DetachNetworkInterfaceResponse:
        record = self._get(request.vm_id).record
        if not any(n.id == request.interface_id for n in record.config.network):
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"vm {request.vm_id} has no network interface {request.interface_id!r}")

        def update(r: records_pb2.VmRecord) -> None:
            remove_by_id(r.config.network, request.interface_id)

        state = await self._hotplug(request.vm_id, "network.hotplug",
                                    agent_pb2.HotplugRequest(detach_nic=request.interface_id),
                                    update)
        return vm_pb2.DetachNetworkInterfaceResponse(success=True, state=state)

    # ---- migration ------------------------------------------------------------------

    @api_method
    async def MigrateVm(self, request: vm_pb2.MigrateVmRequest,
                        context: grpc.aio.ServicerContext) -> vm_pb2.MigrateVmResponse:
        record = self._get(request.vm_id).record
        if request.target_backend and request.target_backend != record.backend:
            raise failed_precondition(
                f"vm {record.vm_id} runs on {record.backend} and cannot be migrated to "
                f"{request.target_backend}: VMs cannot be migrated between backends at runtime. "
                "To switch backends, create a new VM with the desired backend, migrate the "
                "application data, switch traffic to the new VM, then delete the old one")
        raise ApiError(grpc.StatusCode.UNIMPLEMENTED,
                       f"live migration of vm {record.vm_id} between {record.backend} hosts is "
                       "not supported yet")

    # ---- console --------------------------------------------------------------------

    def _session_for(self, vm_id: str) -> AgentSession:
        record = self._get(vm_id).record
        session = self.hub.host_of(record.host_id)
        if session is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"host {record.host_id} of vm {vm_id} is not connected")
        return session

    @api_method
    async def GetConsoleLog(self, request: vm_pb2.GetConsoleLogRequest,
                            context: grpc.aio.ServicerContext) -> vm_pb2.GetConsoleLogResponse:
        if request.tail_lines < 0:
            raise invalid_field("tail_lines", "must not be negative")
        session = self._session_for(request.vm_id)
        reply = await self._call(session, agent_pb2.Request(console_log=agent_pb2.ConsoleLogRequest(
            vm_id=request.vm_id, tail_lines=request.tail_lines)))
        if reply.error:
            raise ApiError(code_from_name(reply.error_code), reply.error)
        return vm_pb2.GetConsoleLogResponse(text=reply.console_log.text,
                                            truncated=reply.console_log.truncated)

    async def StreamConsole(self, request: vm_pb2.StreamConsoleRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[vm_pb2.StreamConsoleResponse]:
        try:
            session = self._session_for(request.vm_id)
        except ApiError as err:
            await context.abort_with_status(err.to_status())
            return
        req = agent_pb2.Request(console_stream=agent_pb2.ConsoleStreamRequest(
            vm_id=request.vm_id, tail_lines=request.tail_lines))
        async with session.open_request(req) as replies:
            try:
                while True:
                    reply = await replies.get()
                    if reply.error:
                        await context.abort(code_from_name(reply.error_code), reply.error)
                    if reply.console_chunk.data:
                        yield vm_pb2.StreamConsoleResponse(data=reply.console_chunk.data)
                    if not reply.more:
                        return
            finally:
                session.cancel(req.request_id)

