"""VmService read RPCs: one VM's details, a paged list, and a watch of changes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc

from controller.api.operations import VmOperations, api_method
from controller.errors import invalid_field
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


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
            state_reason=self._reason(record))

    def _reason(self, record: records_pb2.VmRecord) -> str:
        if not self.ops.fleet.host_connected(record.host_id):
            return f"host {record.host_id} is not connected"
        return record.status.reason or record.status.error

    @api_method
    async def GetVmInfo(self, request: vm_pb2.GetVmInfoRequest,
                        context: grpc.aio.ServicerContext) -> vm_pb2.GetVmInfoResponse:
        record = self.ops.get(request.vm_id).record
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
        infos = [self.vm_info(s.record) for _, s in sorted(self.ops.cache.vms.items())
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

        async with self.ops.cache.subscribe() as changes:
            for _, stored in sorted(self.ops.cache.vms.items()):
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
