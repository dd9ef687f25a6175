"""VmService console RPCs: relay a VM's serial console (or its hypervisor's log) and live
output from its agent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controller.agent_session import AgentSession
from controller.api.operations import VmOperations, api_method
from controller.errors import ApiError, code_from_name, invalid_field
from controller.etcd import EtcdUnavailable
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2


def check_source(source: vm_pb2.ConsoleSource.ValueType) -> None:
    if source not in vm_pb2.ConsoleSource.values():
        raise invalid_field("source", f"unknown console source {source}; expected one of "
                                      f"{', '.join(vm_pb2.ConsoleSource.keys())}")


class ConsoleRpcs:
    """VmService mixin: a VM's console, read through the agent of its host."""

    ops: VmOperations

    async def _session_for(self, vm_id: str) -> AgentSession:
        record = (await self.ops.get(vm_id)).record
        session = self.ops.hub.host_of(record.host_id)
        if session is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"host {record.host_id} of vm {vm_id} is not connected")
        return session

    @api_method
    async def GetConsoleLog(self, request: vm_pb2.GetConsoleLogRequest,
                            context: grpc.aio.ServicerContext) -> vm_pb2.GetConsoleLogResponse:
        if request.tail_lines < 0:
            raise invalid_field("tail_lines", "must not be negative")
        check_source(request.source)
        session = await self._session_for(request.vm_id)
        reply = await self.ops.call(session, agent_pb2.Request(
            console_log=agent_pb2.ConsoleLogRequest(vm_id=request.vm_id,
                                                    tail_lines=request.tail_lines,
                                                    source=request.source)))
        if reply.error:
            raise ApiError(code_from_name(reply.error_code), reply.error)
        return vm_pb2.GetConsoleLogResponse(text=reply.console_log.text,
                                            truncated=reply.console_log.truncated)

    async def StreamConsole(self, request: vm_pb2.StreamConsoleRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[vm_pb2.StreamConsoleResponse]:
        try:
            check_source(request.source)
            session = await self._session_for(request.vm_id)
        except ApiError as err:
            await context.abort_with_status(err.to_status())
            return
        except EtcdUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable: {err}")
            return
        req = agent_pb2.Request(console_stream=agent_pb2.ConsoleStreamRequest(
            vm_id=request.vm_id, tail_lines=request.tail_lines, source=request.source))
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
