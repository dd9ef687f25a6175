"""Helpers for tests that go through the public API."""

from __future__ import annotations

import asyncio
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.etcd import EtcdClient
from tools.fleet.cluster import Cluster
from vmm.store.v1 import records_pb2


def etcd_revision(cluster: Cluster) -> int:
    """etcd's current revision: unchanged means nothing was written."""

    async def read() -> int:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            return (await client.status()).revision

    return asyncio.run(read())


def wait_report_recorded(cluster: Cluster, vm_id: str, timeout: float = 10.0) -> None:
    """Wait until etcd holds the VM's last report. An RPC answers once the agent reports,
    while the report's write may still be in flight; it changes the record's timestamp."""

    async def wait() -> None:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            deadline = time.monotonic() + timeout
            while True:
                kv = await client.get(f"/vmm/vms/{vm_id}")
                record = records_pb2.VmRecord.FromString(kv.value) if kv else None
                if record is None or record.status.observed_generation >= record.generation:
                    return
                assert time.monotonic() < deadline, f"vm {vm_id}: report not recorded"
                await asyncio.sleep(0.02)

    asyncio.run(wait())


def bad_fields(err: grpc.RpcError) -> list[str]:
    """The field paths of a google.rpc.BadRequest in an error's status details."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields
