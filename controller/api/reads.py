"""VmService read RPCs: one VM's details, a paged list, and a watch of changes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controller.api.operations import VmOperations, api_method
from controller.api.paging import fill_page, page_size, page_token, token_after
from controller.errors import ApiError
from controller.vm_cache import namespace_of
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2


class ReadRpcs:
    """VmService mixin: what the controller knows of VMs, served from its cache."""

    ops: VmOperations

    def vm_info(self, record: records_pb2.VmRecord) -> vm_pb2.VmInfo:
        return vm_pb2.VmInfo(
            vm_id=record.vm_id, state=self.ops.current_state(record),
            vcpu_count=record.config.cpu.vcpu_count,
            memory_size_bytes=record.config.memory.size_bytes,
            created_timestamp=record.created_timestamp,
            modified_timestamp=record.modified_timestamp, metadata=record.config.metadata,
            placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                       simulated=record.simulated),
            state_reason=self._reason(record), namespace=namespace_of(record))

    def _reason(self, record: records_pb2.VmRecord) -> str:
        connected = self.ops.fleet.host_connected(record.host_id)
        if record.deleting and not connected:
            return (f"being deleted: host {record.host_id} is not connected; its resources "
                    "stay reserved until the host confirms the removal or the fencing "
                    "timeout passes")
        if record.deleting:
            return f"being deleted: waiting for host {record.host_id} to remove it"
        if not connected:
            return f"host {record.host_id} is not connected"
        return record.status.reason or record.status.error

    @api_method
    async def GetVmInfo(self, request: vm_pb2.GetVmInfoRequest,
                        context: grpc.aio.ServicerContext) -> vm_pb2.GetVmInfoResponse:
        record = (await self.ops.get(request.vm_id)).record
        session = self.ops.hub.host_of(record.host_id)
        metrics = session.vm_metrics.get(record.vm_id) if session else None
        return vm_pb2.GetVmInfoResponse(
            vm_id=record.vm_id, config=record.config, state=self.ops.current_state(record),
            metrics=metrics or vm_pb2.VmMetrics(), backend_info=record.status.backend_info,
            placement=vm_pb2.Placement(host_id=record.host_id, backend=record.backend,
                                       simulated=record.simulated),
            state_reason=self._reason(record), desired_state=record.desired_state,
            generation=record.generation, observed_generation=record.status.observed_generation,
            created_timestamp=record.created_timestamp,
            modified_timestamp=record.modified_timestamp,
            restart=record.status.restart,
            network_interfaces=record.status.network_interfaces,
            namespace=namespace_of(record))

    @api_method
    async def ListVms(self, request: vm_pb2.ListVmsRequest,
                      context: grpc.aio.ServicerContext) -> vm_pb2.ListVmsResponse:
        after = token_after("vm", request.page_token)
        size = page_size(request.page_size)
        wanted = set(request.state_filter)
        shown = self.ops.readable(request.namespace)
        state = self.ops.current_state
        # The total is counted over the cached VMs of the namespaces shown, in memory; the
        # page itself starts at its place in the id order and reads no further than it needs.
        total = sum(1 for ns, ids in self.ops.cache.by_namespace.items() if shown(ns)
                    for vm_id in ids
                    if not (r := self.ops.cache.vms[vm_id].record).deleting
                    and (not wanted or state(r) in wanted))
        infos = (info for info in (self.vm_info(s.record) for s in self.ops.cache.after(after)
                                   if not s.record.deleting and shown(namespace_of(s.record)))
                 if not wanted or info.state in wanted)
        page, more = fill_page(infos, size)
        token = page_token("vm", page[-1].vm_id) if more else ""
        return vm_pb2.ListVmsResponse(vms=page, next_page_token=token, total_count=total)

    async def WatchVms(self, request: vm_pb2.WatchVmsRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[vm_pb2.WatchVmsResponse]:
        """Each VM once its agent has reported it, then each change of its state.

        A VM whose agent has not reported yet (state UNSPECIFIED) is not announced: its
        first event carries its first real state. Writes that leave the state as it was
        (a new desired state, metrics, a reason) send nothing."""
        ids, states = set(request.vm_ids), set(request.state_filter)
        try:
            shown = self.ops.readable(request.namespace)
        except ApiError as err:
            await context.abort_with_status(err.to_status())
            return
        # The last state this watch saw of each VM, sent or filtered out by state.
        seen: dict[str, vm_pb2.VmState.ValueType] = {}

        def event(info: vm_pb2.VmInfo, new_kind: vm_pb2.VmEventType.ValueType,
                  revision: int) -> vm_pb2.WatchVmsResponse | None:
            if (ids and info.vm_id not in ids) or info.state == vm_pb2.VM_STATE_UNSPECIFIED \
                    or not shown(info.namespace):
                return None
            last = seen.get(info.vm_id)
            if last == info.state:
                return None
            seen[info.vm_id] = info.state
            if states and info.state not in states:
                return None
            kind = new_kind if last is None else vm_pb2.VM_EVENT_TYPE_UPDATED
            return vm_pb2.WatchVmsResponse(type=kind, vm=info, revision=revision)

        async with self.ops.cache.subscribe() as changes:
            for _, stored in sorted(self.ops.cache.vms.items()):
                if reply := event(self.vm_info(stored.record), vm_pb2.VM_EVENT_TYPE_EXISTING,
                                  stored.revision):
                    yield reply
            while True:
                change = await changes.get()
                if change.current is not None:
                    reply = event(self.vm_info(change.current.record),
                                  vm_pb2.VM_EVENT_TYPE_CREATED, change.revision)
                elif change.previous is not None and change.vm_id in seen:
                    del seen[change.vm_id]
                    info = self.vm_info(change.previous.record)
                    reply = (vm_pb2.WatchVmsResponse(type=vm_pb2.VM_EVENT_TYPE_DELETED, vm=info,
                                                     revision=change.revision)
                             if not states or info.state in states else None)
                else:
                    reply = None
                if reply is not None:
                    yield reply
