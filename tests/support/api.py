"""Helpers for tests that go through the public API."""

from __future__ import annotations

import asyncio

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.etcd import EtcdClient
from tools.fleet.cluster import Cluster


def etcd_revision(cluster: Cluster) -> int:
    """etcd's current revision: unchanged means nothing was written."""

    async def read() -> int:
        async with EtcdClient([cluster.etcd.endpoint]) as client:
            return (await client.status()).revision

    return asyncio.run(read())


def bad_fields(err: grpc.RpcError) -> list[str]:
    """The field paths of a google.rpc.BadRequest in an error's status details."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields
