"""VmService lifecycle RPCs: create, boot, pause, resume, shut down, reboot and delete."""

from __future__ import annotations

import uuid

import grpc

from controller import validation
from controller.access import DEFAULT_NAMESPACE
from controller.api.operations import S, VmOperations, api_method, permission_denied, state_name
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
from vmm import features
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
        if self.ops.cache.get(vm_id):
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"vm {vm_id!r} already exists")

        # NICs on fleet networks get their bridge, MTU and an address before placement (which
        # looks for hosts with those bridges); a create that stores nothing gives them back.
        placed = vm_pb2.CreateVmRequest()
        placed.CopyFrom(request)
        violations = await self.networks.attach(vm_id, placed.config)
        if violations:
            raise invalid(violations)
        try:
            stored = await self.placer.place_and_store(vm_id, placed)
        except BaseException:
            await self.networks.release(placed.config.network)
            raise
        record = stored.record
        result = await self.ops.await_generation(record, self.ops.settings.operation_timeout)
        if result is not None and result.record.status.error \
                and result.record.status.observed_generation == record.generation:
            # The hypervisor refused what validation let through: undo the create.
            status = result.record.status
            await self.ops.store.delete_vm(vm_id)
            raise ApiError(code_from_name(status.error_code or "FAILED_PRECONDITION"),
                           f"creating vm {vm_id} on host {record.host_id} failed: {status.error}")
        final = result.record if result else record
        return vm_pb2.CreateVmResponse(
            vm_id=vm_id, state=final.status.state, warnings=record.warnings,
            placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                       simulated=record.simulated))

    @api_method
    async def BootVm(self, request: vm_pb2.BootVmRequest,
                     context: grpc.aio.ServicerContext) -> vm_pb2.BootVmResponse:
        state = await self.ops.transition(
            request.vm_id, "boot", {S.VM_STATE_CREATED, S.VM_STATE_SHUTDOWN, S.VM_STATE_FAILED},
            S.VM_STATE_RUNNING, "vm.boot")
        return vm_pb2.BootVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    async def PauseVm(self, request: vm_pb2.PauseVmRequest,
                      context: grpc.aio.ServicerContext) -> vm_pb2.PauseVmResponse:
        state = await self.ops.transition(request.vm_id, "pause", {S.VM_STATE_RUNNING},
                                          S.VM_STATE_PAUSED, "vm.pause_resume")
        return vm_pb2.PauseVmResponse(success=state == S.VM_STATE_PAUSED, state=state)

    @api_method
    async def ResumeVm(self, request: vm_pb2.ResumeVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.ResumeVmResponse:
        state = await self.ops.transition(request.vm_id, "resume", {S.VM_STATE_PAUSED},
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

        wait = request.timeout_seconds + self.ops.settings.shutdown_grace
        state = await self.ops.transition(
            request.vm_id, "shut down",
            {S.VM_STATE_RUNNING, S.VM_STATE_PAUSED, S.VM_STATE_CREATED, S.VM_STATE_FAILED},
            S.VM_STATE_SHUTDOWN, "vm.shutdown", policy,
            timeout=max(wait, self.ops.settings.operation_timeout))
        return vm_pb2.ShutdownVmResponse(success=state == S.VM_STATE_SHUTDOWN, state=state)

    @api_method
    async def RebootVm(self, request: vm_pb2.RebootVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.RebootVmResponse:
        def bump(r: records_pb2.VmRecord) -> None:
            r.reboot_epoch += 1
            r.force_reboot = request.force

        state = await self.ops.transition(request.vm_id, "reboot", {S.VM_STATE_RUNNING},
                                          S.VM_STATE_RUNNING, "vm.reboot", bump,
                                          timeout=self.ops.settings.operation_timeout
                                          + self.ops.settings.shutdown_grace)
        return vm_pb2.RebootVmResponse(success=state == S.VM_STATE_RUNNING, state=state)

    @api_method
    async def DeleteVm(self, request: vm_pb2.DeleteVmRequest,
                       context: grpc.aio.ServicerContext) -> vm_pb2.DeleteVmResponse:
        stored = self.ops.get(request.vm_id)
        record = stored.record
        state = self.ops.current_state(record)
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
            await self.ops.store.delete_vm(record.vm_id)
            return vm_pb2.DeleteVmResponse(success=True)

        def mark(r: records_pb2.VmRecord) -> None:
            r.deleting = True
            r.force_delete = request.force
            r.generation += 1

        written = await self.ops.store.mutate_vm(record.vm_id, mark)
        if written is None:
            raise not_found(record.vm_id)
        self.ops.cache.note_write(written)
        try:
            wait = self.ops.settings.operation_timeout + self.ops.settings.shutdown_grace
            await self.ops.cache.wait_for(record.vm_id, lambda s: s is None, wait)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"vm {record.vm_id} is marked for deletion, but host {record.host_id} "
                           "has not confirmed its removal yet") from None
        return vm_pb2.DeleteVmResponse(success=True)
