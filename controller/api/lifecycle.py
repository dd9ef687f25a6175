"""VmService lifecycle RPCs: create, boot, pause, resume, shut down, reboot and delete."""

from __future__ import annotations

import uuid

import grpc

from controller import validation
from controller.access import DEFAULT_NAMESPACE
from controller.api.operations import (
    S,
    VmOperations,
    api_method,
    idempotent,
    permission_denied,
    state_name,
)
from controller.auth import current_caller
from controller.errors import (
    ApiError,
    Violation,
    code_from_name,
    failed_precondition,
    invalid,
    invalid_field,
    not_found,
)
from controller.networks import Networks
from controller.placement import Placer
from controller.store import StoredVm
from controller.vm_cache import namespace_of
from vmm import features
from vmm.common import failpoints
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2


def new_vm_id() -> str:
    # 96 random bits; the create transaction's create_revision == 0 guard makes a
    # collision an ALREADY_EXISTS retry rather than an overwrite.
    return f"vm-{uuid.uuid4().hex[:24]}"


class LifecycleRpcs:
    """VmService mixin: bringing VMs into being, through their states, and out again."""

    ops: VmOperations
    placer: Placer
    networks: Networks

    @api_method
    @idempotent(vm_pb2.CreateVmResponse)
    async def CreateVm(self, request: vm_pb2.CreateVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.CreateVmResponse:
        violations = validation.check_vm_id(request.vm_id) if request.vm_id else []
        if not request.HasField("config"):
            violations.append(Violation("config", "is required"))
        else:
            violations += validation.check_config(request.config)
        if request.backend and request.backend not in features.BACKENDS:
            violations.append(Violation(
                "backend", f"{validation.shown(request.backend)} is not one of "
                f"{', '.join(features.BACKENDS)}"))
        if len(request.host_id) > validation.MAX_LOOKUP_ID:
            violations.append(Violation("host_id", f"{validation.shown(request.host_id)} is "
                                        "longer than any host id"))
        namespace = request.namespace or DEFAULT_NAMESPACE
        violations += validation.check_namespace(namespace)
        if violations:
            raise invalid(violations)
        caller = current_caller()
        if not caller.may_see(namespace):
            raise permission_denied(caller, namespace)
        vm_id = request.vm_id or new_vm_id()
        # The cache answers the common case; a record it has not seen yet (another replica's,
        # written a moment ago) fails the create transaction's guard instead of costing every
        # create an etcd read.
        if existing := self.ops.cache.get(vm_id):
            return await self._created_before(existing, request)

        # NICs on fleet networks get their bridge, MTU and an address before placement (which
        # looks for hosts with those bridges); a create that stores nothing gives them back.
        placed = vm_pb2.CreateVmRequest()
        placed.CopyFrom(request)
        violations = await self.networks.attach(vm_id, placed.config)
        if violations:
            raise invalid(violations)
        try:
            stored = await self.placer.place_and_store(vm_id, placed)
        except BaseException as err:
            await self.networks.release(placed.config.network)
            if not (isinstance(err, ApiError) and err.code == grpc.StatusCode.ALREADY_EXISTS):
                raise
            # Another replica's record, not in this cache yet: compare with it.
            found = await self.ops.store.get_vm(vm_id)
            if found is None:
                raise
            return await self._created_before(found, request)
        record = stored.record
        result = await self.ops.await_generation(record, self.ops.settings.operation_timeout)
        if result is not None and result.record.status.error \
                and result.record.status.observed_generation == record.generation:
            # The hypervisor refused what validation let through: undo the create.
            status = result.record.status
            await self.ops.store.delete_vm(vm_id)
            raise ApiError(code_from_name(status.error_code or "FAILED_PRECONDITION"),
                           f"creating vm {vm_id} on host {record.host_id} failed: {status.error}")
        return created_response(result.record if result else record)

    async def _created_before(self, existing: StoredVm,
                              request: vm_pb2.CreateVmRequest) -> vm_pb2.CreateVmResponse:
        """A create of an id that exists: a retry of the same create is answered with that
        VM, once its host has created it; another config is ALREADY_EXISTS."""
        record = existing.record
        if not current_caller().may_see(namespace_of(record)) or not same_create(record, request):
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"vm {record.vm_id!r} already exists with another config")
        if record.deleting:
            raise ApiError(grpc.StatusCode.ABORTED,
                           f"vm {record.vm_id!r} is being deleted; create it again once it "
                           "is gone")
        first = records_pb2.VmRecord(vm_id=record.vm_id, host_id=record.host_id, generation=1)
        if self.ops.fleet.host_connected(record.host_id):
            result = await self.ops.await_generation(first, self.ops.settings.operation_timeout)
            if result is None:
                raise ApiError(grpc.StatusCode.ABORTED,
                               f"vm {record.vm_id!r} was deleted meanwhile")
            record = result.record
        return created_response(record)

    @api_method
    @idempotent(vm_pb2.BootVmResponse)
    async def BootVm(self, request: vm_pb2.BootVmRequest,
                     context: grpc.aio.ServicerContext) -> vm_pb2.BootVmResponse:
        state = await self.ops.transition(
            request.vm_id, "boot", {S.VM_STATE_CREATED, S.VM_STATE_SHUTDOWN, S.VM_STATE_FAILED},
            S.VM_STATE_RUNNING, "vm.boot")
        return vm_pb2.BootVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    @idempotent(vm_pb2.PauseVmResponse)
    async def PauseVm(self, request: vm_pb2.PauseVmRequest,
                      context: grpc.aio.ServicerContext) -> vm_pb2.PauseVmResponse:
        state = await self.ops.transition(request.vm_id, "pause", {S.VM_STATE_RUNNING},
                                          S.VM_STATE_PAUSED, "vm.pause_resume")
        return vm_pb2.PauseVmResponse(success=state == S.VM_STATE_PAUSED, state=state)

    @api_method
    @idempotent(vm_pb2.ResumeVmResponse)
    async def ResumeVm(self, request: vm_pb2.ResumeVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.ResumeVmResponse:
        state = await self.ops.transition(request.vm_id, "resume", {S.VM_STATE_PAUSED},
                                          S.VM_STATE_RUNNING, "vm.pause_resume")
        return vm_pb2.ResumeVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    @idempotent(vm_pb2.ShutdownVmResponse)
    async def ShutdownVm(self, request: vm_pb2.ShutdownVmRequest,
                         context: grpc.aio.ServicerContext) -> vm_pb2.ShutdownVmResponse:
        if request.timeout_seconds < 0:
            raise invalid_field("timeout_seconds", f"must not be negative, got "
                                f"{request.timeout_seconds}")

        def policy(r: records_pb2.VmRecord) -> None:
            r.shutdown.force = request.force
            r.shutdown.timeout_seconds = request.timeout_seconds

        wait = request.timeout_seconds + self.ops.settings.shutdown_grace
        state = await self.ops.transition(
            request.vm_id, "shut down",
            {S.VM_STATE_RUNNING, S.VM_STATE_PAUSED, S.VM_STATE_CREATED, S.VM_STATE_FAILED},
            S.VM_STATE_SHUTDOWN, "vm.shutdown", policy,
            timeout=max(wait, self.ops.settings.operation_timeout))
        return vm_pb2.ShutdownVmResponse(success=state == S.VM_STATE_SHUTDOWN, state=state)

    @api_method
    @idempotent(vm_pb2.RebootVmResponse)
    async def RebootVm(self, request: vm_pb2.RebootVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.RebootVmResponse:
        def bump(r: records_pb2.VmRecord) -> None:
            r.reboot_epoch += 1
            r.force_reboot = request.force

        state = await self.ops.transition(request.vm_id, "reboot", {S.VM_STATE_RUNNING},
                                          S.VM_STATE_RUNNING, "vm.reboot", bump,
                                          timeout=self.ops.settings.operation_timeout
                                          + self.ops.settings.shutdown_grace,
                                          repeatable=False)
        return vm_pb2.RebootVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    @idempotent(vm_pb2.DeleteVmResponse, when_gone=vm_pb2.DeleteVmResponse(success=True))
    async def DeleteVm(self, request: vm_pb2.DeleteVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.DeleteVmResponse:
        stored = await self.ops.get(request.vm_id)
        record = stored.record
        state = self.ops.current_state(record)
        if state in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED) and not request.force:
            raise failed_precondition(
                f"cannot delete vm {record.vm_id}: it is {state_name(state)}; shut it down first "
                "or delete with force")
        disconnected = state == S.VM_STATE_UNKNOWN
        if disconnected and not request.force:
            raise failed_precondition(
                f"cannot delete vm {record.vm_id}: its host {record.host_id} is not "
                "connected; delete with force to forget it (the agent removes it when it "
                "reconnects)")

        def mark(r: records_pb2.VmRecord) -> bool:
            if r.deleting and (r.force_delete or not request.force):
                return False  # a retry: the deletion is under way
            r.deleting = True
            r.force_delete = request.force
            r.generation += 1
            return True

        # The mark goes with the deletion, so that a retry whose VM is gone knows it was this
        # call that removed it, even if the answer never reached the caller.
        pending = await self.ops.requests.pending_mark("DeleteVm", request)
        written = await self.ops.store.mutate_vm(record.vm_id, mark, also=pending)
        failpoints.hit("controller.vm.mutated", record.vm_id)
        if written is None:
            raise not_found(record.vm_id)
        self.ops.cache.note_write(written)
        if disconnected:
            # The VM may still run there: its resources stay reserved until the host
            # confirms the removal or the fencing timeout passes (the leader's housekeeping).
            return vm_pb2.DeleteVmResponse(success=True)
        try:
            wait = self.ops.settings.operation_timeout + self.ops.settings.shutdown_grace
            await self.ops.cache.wait_for(record.vm_id, lambda s: s is None, wait)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"vm {record.vm_id} is marked for deletion, but host {record.host_id} "
                           "has not confirmed its removal yet") from None
        return vm_pb2.DeleteVmResponse(success=True)


def created_response(record: records_pb2.VmRecord) -> vm_pb2.CreateVmResponse:
    return vm_pb2.CreateVmResponse(
        vm_id=record.vm_id, state=record.status.state, warnings=record.warnings,
        placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                   simulated=record.simulated))


def same_create(record: records_pb2.VmRecord, request: vm_pb2.CreateVmRequest) -> bool:
    """Whether request asks for the VM record holds: its config as the client sent it (before
    fleet networks filled in its NICs), backend, host and namespace."""
    sent = vm_pb2.VmConfig()
    sent.CopyFrom(record.config)
    if len(sent.network) == len(request.config.network):
        for nic, asked in zip(sent.network, request.config.network, strict=True):
            if asked.network and not asked.ip_address:  # what Networks.attach filled in
                for name in ("bridge", "mtu", "vlan", "gateway", "ip_address"):
                    nic.ClearField(name)  # type: ignore[arg-type]
    return sent == request.config and request.backend in ("", record.backend) \
        and request.host_id in ("", record.host_id) \
        and (request.namespace or DEFAULT_NAMESPACE) == namespace_of(record)
