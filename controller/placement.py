"""Placing a new VM: choose a host and backend from the in-memory fleet index, have the
chosen agent preflight it, and commit the VM with its host's allocation (host_commits)."""

from __future__ import annotations

import logging
import time

import grpc

from controller import scheduler, validation
from controller.access import DEFAULT_NAMESPACE
from controller.api.operations import S, VmOperations, raise_for_reply
from controller.errors import ApiError, Violation, failed_precondition, invalid
from controller.host_commits import HostCommits
from controller.store import StoredVm, now
from controller.vm_cache import namespace_of
from vmm.agent.v1 import agent_pb2
from vmm.common import failpoints
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)


def new_record(vm_id: str, config: vm_pb2.VmConfig, choice: scheduler.Choice,
               namespace: str = DEFAULT_NAMESPACE) -> records_pb2.VmRecord:
    """The VM at generation 1, placed on the chosen host with its resources reserved."""
    ts = now()
    return records_pb2.VmRecord(
        vm_id=vm_id, namespace=namespace, config=config, backend=choice.backend.name,
        host_id=choice.host.host_id,
        generation=1, desired_state=S.VM_STATE_CREATED, simulated=choice.backend.simulated,
        reserved=host_pb2.Resources(vcpus=choice.demand.vcpus,
                                    memory_bytes=choice.demand.memory),
        created_timestamp=ts, modified_timestamp=ts, warnings=choice.fit.warnings)

PLACEMENT_ATTEMPTS = 20


class Placer:
    """Places new VMs for one controller replica.

    Decisions come from the in-memory fleet index and take no lock: the chosen host's room is
    reserved in memory at once ("assumed"), so concurrent creates see it as used while the
    agent preflights the VM and the commit is in flight. A commit that loses to another
    replica refreshes that host and decides again.
    """

    def __init__(self, ops: VmOperations) -> None:
        self.ops = ops
        self.commits = HostCommits(ops.store, ops.fleet, ops.cache, ops.quota_of)
        # (host id, disk path) -> {vm id: (writable?, namespace)} of the creates in flight.
        self._disk_claims: dict[tuple[str, str], dict[str, tuple[bool, str]]] = {}

    async def place_and_store(self, vm_id: str, request: vm_pb2.CreateVmRequest) -> StoredVm:
        """Record the VM at generation 1 on the host chosen for it, its resources reserved."""
        fleet, config = self.ops.fleet, request.config
        for _attempt in range(PLACEMENT_ATTEMPTS):
            started = time.perf_counter()
            choice = self._decide(request)
            if isinstance(choice, scheduler.NoPlacement):
                self.ops.telemetry.observe_placement(time.perf_counter() - started, "exhausted")
                raise self._no_placement(request, choice)
            host_id, demand = choice.host.host_id, choice.demand
            self._refuse_shared_writable_disks(host_id, vm_id, request)
            fleet.index.reserve(host_id, demand)
            claimed = self._claim_disks(host_id, vm_id, request)
            try:
                await self._preflight(choice, vm_id, config)
                record = new_record(vm_id, config, choice,
                                    request.namespace or DEFAULT_NAMESPACE)
                stored = await self.commits.commit(record, demand)
                if stored is not None:
                    self.ops.cache.note_write(stored)  # the cache holds its disks from here
            except BaseException:
                self.ops.telemetry.observe_placement(time.perf_counter() - started, "error")
                raise
            finally:
                fleet.index.unreserve(host_id, demand)
                self.release_disks(claimed, vm_id)
            if stored is None:
                self.ops.telemetry.placement_conflicts.add(1)
                self.ops.telemetry.observe_placement(time.perf_counter() - started, "conflicted")
                continue
            failpoints.hit("controller.create.committed", vm_id)
            self.ops.telemetry.observe_placement(time.perf_counter() - started, "placed")
            self.ops.telemetry.placed(host_id, choice.backend.name)
            log.debug("vm %s placed on host %s (%s) in %.1f ms", vm_id, host_id,
                     choice.backend.name, (time.perf_counter() - started) * 1000)
            return stored
        raise ApiError(grpc.StatusCode.ABORTED,
                       "placement kept racing concurrent creates; try again")

    def _decide(self, request: vm_pb2.CreateVmRequest) -> scheduler.Choice | scheduler.NoPlacement:
        fleet = self.ops.fleet
        while True:
            choice = fleet.index.place(
                request.config, backend=request.backend, host_id=request.host_id,
                preference=self.ops.settings.backend_preference,
                reserve_max=self.ops.settings.reserve_hotplug_maximum)
            if isinstance(choice, scheduler.NoPlacement) or fleet.schedulable(
                    choice.host.host_id):
                return choice
            # Went quiet since the index last heard of it: correct the index, choose again.
            fleet.refresh(choice.host.host_id)

    def _no_placement(self, request: vm_pb2.CreateVmRequest,
                      why: scheduler.NoPlacement) -> ApiError:
        wanted = request.backend or "any backend"
        if request.host_id:
            named = self.ops.fleet.index.get(request.host_id)
            if named is None or not named.ready:
                return failed_precondition(f"host {request.host_id!r} is not connected")
        if why.missing_bridges:
            wanted_bridges = ", ".join(sorted(why.missing_bridges))
            return failed_precondition(
                f"no ready host has the bridges of the VM's networks ({wanted_bridges})")
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
        best = why.roomiest
        free = (f"; the host with most room, {best.host_id}, has {best.free_vcpus} vCPUs and "
                f"{validation.human_bytes(max(best.free_memory, 0))} free") if best else ""
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"no host has room for {why.demand.describe()} on {wanted}{free}")

    def _refuse_shared_writable_disks(self, host_id: str, vm_id: str,
                                      request: vm_pb2.CreateVmRequest) -> None:
        """Two VMs must never write one disk image: the guests' file systems would corrupt
        each other, and hypervisors that lock images (Cloud Hypervisor, QEMU) fail to boot
        the second. A writable disk may have no other user on its host; a read-only one no
        writer. Checked against this replica's cache (an index by host and path), the creates
        in flight on this replica (_claim_disks, taken with no await after this check) and
        the config's own other disks. A VM of another namespace is not named."""
        config, namespace = request.config, request.namespace or DEFAULT_NAMESPACE
        violations: list[Violation] = []
        seen: dict[str, int] = {}
        for i, disk in enumerate(config.storage):
            field_path = f"config.storage[{i}].path"
            first = seen.setdefault(disk.path, i)
            if first != i and not (disk.read_only and config.storage[first].read_only):
                violations.append(Violation(field_path, f"{disk.path!r} is also "
                                            f"config.storage[{first}]; an image written by "
                                            "one disk cannot be another"))
                continue
            if (conflict := self.disk_conflict(host_id, vm_id, namespace, disk,
                                               field_path)) is not None:
                violations.append(conflict)
        if violations:
            raise invalid(violations)

    def disk_conflict(self, host_id: str, vm_id: str, namespace: str,
                      disk: vm_pb2.StorageDevice, field_path: str) -> Violation | None:
        """Whether another VM on the host uses the disk's image in a way this one may not
        share: it writes it, or this disk would."""
        users = {other: (writable, self._namespace_of(other))
                 for other, writable in self.ops.cache.users_of_disk(host_id,
                                                                     disk.path).items()}
        users.update(self._disk_claims.get((host_id, disk.path), {}))
        for other, (writable, other_namespace) in sorted(users.items()):
            if other != vm_id and (writable or not disk.read_only):
                who = (f"VM {other!r}" if other_namespace == namespace
                       else "a VM of another namespace")
                return Violation(field_path, (
                    f"{disk.path!r} on host {host_id} is already "
                    f"{'written' if writable else 'read'} by {who}; two VMs cannot share "
                    "an image one of them writes"))
        return None

    def _namespace_of(self, vm_id: str) -> str:
        stored = self.ops.cache.get(vm_id)
        return namespace_of(stored.record) if stored is not None else ""

    def _claim_disks(self, host_id: str, vm_id: str,
                     request: vm_pb2.CreateVmRequest) -> list[tuple[str, str]]:
        """Hold the VM's disks on the host while its create is in flight, so that a
        concurrent create on this replica sees them before the cache does."""
        namespace = request.namespace or DEFAULT_NAMESPACE
        return [self.claim_disk(host_id, vm_id, namespace, disk)
                for disk in request.config.storage]

    def claim_disk(self, host_id: str, vm_id: str, namespace: str,
                   disk: vm_pb2.StorageDevice) -> tuple[str, str]:
        """Hold one disk for the VM until release_disks: a create or an attach in flight."""
        key = (host_id, disk.path)
        self._disk_claims.setdefault(key, {})[vm_id] = (not disk.read_only, namespace)
        return key

    def release_disks(self, keys: list[tuple[str, str]], vm_id: str) -> None:
        for key in keys:
            users = self._disk_claims.get(key)
            if users is not None:
                users.pop(vm_id, None)
                if not users:
                    del self._disk_claims[key]

    async def _preflight(self, choice: scheduler.Choice, vm_id: str,
                         config: vm_pb2.VmConfig) -> None:
        session = self.ops.hub.host_of(choice.host.host_id)
        if session is None:
            return  # connected to another controller replica; the agent checks again at create
        backend = choice.backend.name
        if session.preflights.passed(backend, config):
            return  # passed a moment ago (controller.preflights); checked again at create
        raise_for_reply(await self.ops.call(session, agent_pb2.Request(
            preflight=agent_pb2.PreflightRequest(vm_id=vm_id, config=config, backend=backend))))
        session.preflights.note_passed(backend, config)
