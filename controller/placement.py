"""Placing a new VM: choose a host and backend with the scheduler, have the chosen agent
preflight it, and commit the VM record with the host's allocation in one etcd transaction."""

from __future__ import annotations

import asyncio
import logging

import grpc

from controller import scheduler, validation
from controller.api.operations import S, VmOperations, raise_for_reply
from controller.errors import ApiError, failed_precondition, invalid, not_found
from controller.store import CreateOutcome, StoredVm, now
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)

PLACEMENT_ATTEMPTS = 20


class Placer:
    """Places new VMs for one controller replica."""

    def __init__(self, ops: VmOperations) -> None:
        self.ops = ops
        self._lock = asyncio.Lock()

    async def place_and_store(self, vm_id: str, request: vm_pb2.CreateVmRequest) -> StoredVm:
        """Record the VM at generation 1 on the host chosen for it, its resources reserved."""
        # One placement at a time per controller: concurrent creates would otherwise all
        # pick the same densest host and retry each other's conflicts. The transaction's
        # revision compare still guards against other controller replicas.
        async with self._lock:
            return await self._place_and_store_locked(vm_id, request)

    async def _place_and_store_locked(self, vm_id: str,
                                      request: vm_pb2.CreateVmRequest) -> StoredVm:
        config = request.config
        for _attempt in range(PLACEMENT_ATTEMPTS):
            hosts = await self.ops.fleet.host_views()
            demand_of = self._demands(config, hosts)
            choice = scheduler.place(config, hosts, backend=request.backend,
                                     host_id=request.host_id,
                                     preference=self.ops.settings.backend_preference,
                                     demand_of=demand_of)
            if isinstance(choice, scheduler.NoPlacement):
                raise self._no_placement(request, choice, hosts, demand_of)
            await self._preflight(choice, vm_id, config)
            backend = choice.backend.name
            demand = demand_of.get(backend) or scheduler.demand_for(config, False)
            alloc = await self.ops.store.get_allocation(choice.host.host_id)
            if alloc.revision != choice.host.allocation_revision:
                self.ops.telemetry.placement_conflicts.add(1)
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
            outcome = await self.ops.store.create_vm(record, alloc, new_alloc)
            if outcome is CreateOutcome.EXISTS:
                raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"vm {vm_id!r} already exists")
            if outcome is CreateOutcome.ALLOCATION_CHANGED:
                self.ops.telemetry.placement_conflicts.add(1)
                continue
            self.ops.telemetry.placed(record.host_id, backend)
            stored = await self.ops.store.get_vm(vm_id)
            if stored is None:  # deleted in between by someone else
                raise not_found(vm_id)
            self.ops.cache.note_write(stored)
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
                    config, self.ops.settings.reserve_hotplug_maximum and honours_max)
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
        session = self.ops.hub.host_of(choice.host.host_id)
        if session is None:
            return  # connected to another controller replica; the agent checks again at create
        raise_for_reply(await self.ops.call(session, agent_pb2.Request(
            preflight=agent_pb2.PreflightRequest(vm_id=vm_id, config=config,
                                                 backend=choice.backend.name))))
