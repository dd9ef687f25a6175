"""What every VmService RPC shares: error mapping, agent calls, and recording a desired state
then waiting for the agent to report it."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from controller import validation
from controller.access import ALL_NAMESPACES, DEFAULT_NAMESPACE, Access, Caller, Quota
from controller.agent_hub import AgentHub
from controller.agent_session import AgentSession
from controller.api.requests import DEFAULT_RETENTION, RequestLog
from controller.auth import current_caller
from controller.errors import (
    ApiError,
    Violation,
    code_from_name,
    failed_precondition,
    invalid,
    not_found,
)
from controller.etcd import EtcdError, EtcdUnavailable
from controller.fleet import Fleet
from controller.status_writes import Report
from controller.store import ConflictError, Store, StoredVm
from controller.telemetry import Telemetry
from controller.vm_cache import VmCache, namespace_of
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.common import failpoints
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

S = vm_pb2.VmState
T = TypeVar("T")
M = TypeVar("M", bound=Message)


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
    # Seconds an answer to a call with a request_id is kept for its retries (AIP-155).
    request_id_retention: float = DEFAULT_RETENTION


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
        except EtcdError as err:
            # Requests are bounded well below etcd's limits; should one still be refused
            # (a size limit lowered on the etcd side), say so rather than INTERNAL/UNKNOWN.
            code = (grpc.StatusCode.RESOURCE_EXHAUSTED
                    if err.code in (grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED)
                    else grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, f"etcd refused the request: {err}")
        except ConflictError as err:
            await context.abort(grpc.StatusCode.ABORTED, str(err))
        raise AssertionError("unreachable")

    return wrapper


def permission_denied(caller: Caller, namespace: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED,
                    f"{caller.describe()} may not use namespace {namespace!r}")


def idempotent(response_type: type[M], when_gone: M | None = None
               ) -> Callable[[Callable[..., Awaitable[M]]], Callable[..., Awaitable[M]]]:
    """Carry out a call with a request_id once; its retries get the first answer.

    `when_gone` answers a retry of a call that had marked its change pending and whose VM
    is gone since (see RequestLog.pending_mark)."""

    def decorate(handler: Callable[..., Awaitable[M]]) -> Callable[..., Awaitable[M]]:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> M:
            return await self.ops.requests.once(
                handler.__name__, request, response_type,
                lambda: handler(self, request, context), when_gone)

        return wrapper

    return decorate


def state_name(state: int) -> str:
    return vm_pb2.VmState.Name(state).removeprefix("VM_STATE_")  # type: ignore[arg-type]


def raise_for_reply(reply: agent_pb2.Reply) -> None:
    """Raise the agent's refusal (bad fields or an error) as the API error it names."""
    if reply.violations:
        raise invalid([Violation(v.field, v.description) for v in reply.violations])
    if reply.error:
        raise ApiError(code_from_name(reply.error_code), reply.error)


class VmOperations:
    """The controller's view of VMs and their agents: look a VM up, ask its agent, change its
    desired state and wait until the agent reports it."""

    def __init__(self, store: Store, cache: VmCache, hub: AgentHub, fleet: Fleet,
                 telemetry: Telemetry, settings: VmServiceSettings,
                 access: Callable[[], Access | None] = lambda: None) -> None:
        self.store = store
        self.cache = cache
        self.hub = hub
        self.fleet = fleet
        self.telemetry = telemetry
        self.settings = settings
        self.access = access
        self.requests = RequestLog(store, settings.request_id_retention)

    async def get(self, vm_id: str) -> StoredVm:
        """The VM, if the caller may see its namespace: one of another namespace is
        NOT_FOUND, exactly as if it did not exist. One this replica's watch has not
        brought yet (created through another replica a moment ago) is read from etcd, so
        that a client finds what it created wherever it asks next."""
        if violations := validation.check_vm_id_lookup(vm_id):
            raise invalid(violations)
        stored = self.cache.get(vm_id)
        if stored is None and (found := await self.store.get_vm(vm_id)) is not None:
            self.cache.note_write(found)
            stored = self.cache.get(vm_id)  # None if the watch has seen it deleted since
        if stored is None or not current_caller().may_see(namespace_of(stored.record)):
            raise not_found(vm_id)
        return stored

    def quota_of(self, namespace: str) -> Quota | None:
        access = self.access()
        return access.quotas.get(namespace) if access else None

    @staticmethod
    def readable(requested: str) -> Callable[[str], bool]:
        """Which namespaces a listing shows: the one named ("default" when empty), or
        with "*" every namespace the caller may read."""
        caller = current_caller()
        if requested == ALL_NAMESPACES:
            return caller.may_see
        namespace = requested or DEFAULT_NAMESPACE
        if violations := validation.check_namespace(namespace):
            raise invalid(violations)
        if not caller.may_see(namespace):
            raise permission_denied(caller, namespace)
        return lambda candidate: candidate == namespace

    def current_state(self, record: records_pb2.VmRecord) -> vm_pb2.VmState.ValueType:
        if not self.fleet.host_connected(record.host_id):
            return S.VM_STATE_UNKNOWN
        return record.status.state

    async def call(self, session: AgentSession, request: agent_pb2.Request) -> agent_pb2.Reply:
        kind = request.WhichOneof("kind")
        try:
            with self.telemetry.tracer.start_as_current_span(f"agent.{kind}") as span:
                span.set_attribute("vmm.host_id", session.host_id)
                return await session.call(request, self.settings.operation_timeout)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"host {session.host_id} did not answer within "
                           f"{self.settings.operation_timeout:.0f}s") from None

    async def await_generation(self, record: records_pb2.VmRecord,
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

    async def settled(self, vm_id: str, verb: str, timeout: float) -> StoredVm:
        """The VM's record once no change of it is under way. A generation its agent has not
        carried out yet (a create not yet reported, a boot in progress) is waited for, not
        refused: the state it would be refused for is about to change."""
        stored = await self.get(vm_id)
        record = stored.record
        if record.status.observed_generation >= record.generation or record.deleting \
                or not self.fleet.host_connected(record.host_id):
            return stored
        try:
            found = await self.cache.wait_for(
                vm_id, lambda s: s is None or s.record.deleting
                or s.record.status.observed_generation >= s.record.generation, timeout)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"cannot {verb} vm {vm_id} yet: host {record.host_id} is still "
                           f"carrying out its generation {record.generation}; try again") \
                from None
        if found is None:
            raise not_found(vm_id)
        return found

    async def transition(self, vm_id: str, verb: str, allowed: set[int], target: int,
                         feature_key: str, edit: Callable[[records_pb2.VmRecord], None] | None
                         = None, timeout: float | None = None, repeatable: bool = True
                         ) -> vm_pb2.VmState.ValueType:
        """Record the target state and wait until the agent has carried it out.

        repeatable: asking again for the state the VM is in (and meant to be in) succeeds
        at once, so a retried call is answered like the first one."""
        timeout = timeout or self.settings.operation_timeout
        await self.settled(vm_id, verb, timeout)
        # The agent's last report, if its write has not gone yet, goes with this change.
        report = self.hub.status_writes.claim(vm_id)
        try:
            state, written = await self._change_state(vm_id, verb, allowed, target,
                                                      feature_key, edit, timeout, repeatable,
                                                      report)
        except BaseException:
            if report is not None:
                self.hub.status_writes.unclaim(report)
            raise
        if report is not None:
            self.hub.status_writes.settle(report, written)
        if written is None:
            return state
        result = await self.await_generation(written.record, timeout)
        if result is None:
            raise not_found(vm_id)
        status = result.record.status
        if status.error and status.observed_generation == written.record.generation:
            if status.state != S.VM_STATE_FAILED:
                # Make desired match what runs again; a FAILED VM keeps its failed
                # generation, which the agent leaves alone until the next request.
                await self._roll_back(vm_id, written.record.generation, state)
            raise ApiError(code_from_name(status.error_code or "FAILED_PRECONDITION"),
                           f"{verb} vm {vm_id} failed: {status.error}")
        if result.record.deleting or status.state != target:
            # A later change (or the VM itself) moved it on: never OK with success=false.
            now = "being deleted" if result.record.deleting else state_name(status.state)
            reason = f": {status.reason}" if status.reason else ""
            raise ApiError(grpc.StatusCode.ABORTED,
                           f"{verb} vm {vm_id}: it is {now} now{reason}")
        return status.state

    async def _change_state(self, vm_id: str, verb: str, allowed: set[int], target: int,
                            feature_key: str,
                            edit: Callable[[records_pb2.VmRecord], None] | None,
                            timeout: float, repeatable: bool, report: Report | None
                            ) -> tuple[vm_pb2.VmState.ValueType, StoredVm | None]:
        """Check the transition and record it: (the state before, the record written), or
        (the state, None) when the VM is there already. With the VM's pending report, the
        record is written with that report in it."""
        if report is not None:
            shown = self.cache.get(vm_id)  # the record with the report shown in it
            if shown is None:
                raise not_found(vm_id)
            stored, known = shown, report.known
        else:
            # What the agent last reported may still be on its way to etcd: the change goes
            # after that write, rather than lose a compare to it and go round again.
            try:
                recorded = await self.cache.recorded(vm_id, timeout)
            except TimeoutError:
                raise ApiError(grpc.StatusCode.UNAVAILABLE,
                               f"cannot {verb} vm {vm_id} yet: its last report is still "
                               "being recorded; try again") from None
            if recorded is None:
                raise not_found(vm_id)
            stored = known = recorded
        record = stored.record
        if record.deleting:
            raise ApiError(grpc.StatusCode.ABORTED,
                           f"cannot {verb} vm {vm_id}: it is being deleted")
        state = self.current_state(record)
        if state == S.VM_STATE_UNKNOWN:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"cannot {verb} vm {vm_id}: its host {record.host_id} is not connected")
        if repeatable and state == target and record.desired_state == target \
                and not record.status.error:
            return state, None
        if state not in allowed:
            raise failed_precondition(f"cannot {verb} vm {vm_id}: it is {state_name(state)}")
        caps = self.fleet.capabilities(record.host_id, record.backend)
        if caps is not None and (msg := validation.required_feature(caps, feature_key)):
            raise failed_precondition(msg)

        def change(r: records_pb2.VmRecord) -> None:
            if report is not None:
                report.change(r)
            r.desired_state = target  # type: ignore[assignment]
            r.generation += 1
            if edit:
                edit(r)

        written = await self.store.mutate_vm(vm_id, change, known=known)
        failpoints.hit("controller.vm.mutated", vm_id)
        if written is None:
            raise not_found(vm_id)
        self.cache.note_write(written)
        return record.status.state, written

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
