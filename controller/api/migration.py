"""VmService migration RPC: moving a VM between hosts (refused until live migration exists)."""

from __future__ import annotations

import grpc

from controller.api.operations import VmOperations, api_method
from controller.errors import ApiError, failed_precondition
from vmm.v1 import vm_pb2


class MigrationRpcs:
    """VmService mixin: migrating a VM to another host."""

    ops: VmOperations

    @api_method
    async def MigrateVm(self, request: vm_pb2.MigrateVmRequest,
                        context: grpc.aio.ServicerContext) -> vm_pb2.MigrateVmResponse:
        record = (await self.ops.get(request.vm_id)).record
        if request.target_backend and request.target_backend != record.backend:
            raise failed_precondition(
                f"vm {record.vm_id} runs on {record.backend} and cannot be migrated to "
                f"{request.target_backend}: VMs cannot be migrated between backends at runtime. "
                "To switch backends, create a new VM with the desired backend, migrate the "
                "application data, switch traffic to the new VM, then delete the old one")
        raise ApiError(grpc.StatusCode.UNIMPLEMENTED,
                       f"live migration of vm {record.vm_id} between {record.backend} hosts is "
                       "not supported yet")
