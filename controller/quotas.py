"""Namespace quotas: what the VMs of a namespace may hold together.

A namespace with a quota has a usage record in etcd (`Store.get_usage`); every create there
compares it in the same transaction that stores the VM, so replicas deciding at the same time
cannot overcommit the quota: one of them loses the compare and decides again.
"""

from __future__ import annotations

import grpc

from controller.access import Quota
from controller.errors import ApiError
from controller.store import StoredAllocation
from controller.validation import human_bytes
from controller.vm_cache import VmCache
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2


def over_quota(namespace: str, quota: Quota, usage: records_pb2.Allocation,
               reserved: host_pb2.Resources) -> ApiError | None:
    """RESOURCE_EXHAUSTED naming the first limit one more VM holding `reserved` would
    break, or None."""
    held = usage.allocated
    checks = (
        ("max_vms", quota.max_vms, usage.vm_count, 1, str),
        ("max_vcpus", quota.max_vcpus, held.vcpus, reserved.vcpus, str),
        ("max_memory_bytes", quota.max_memory_bytes, held.memory_bytes, reserved.memory_bytes,
         human_bytes),
    )
    for name, limit, used, more, show in checks:
        if limit and used + more > limit:
            return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"namespace {namespace!r} quota {name} is {show(limit)}: "
                            f"{show(used)} in use, this VM needs {show(more)} more")
    return None


def plus(usage: records_pb2.Allocation, reserved: host_pb2.Resources) -> records_pb2.Allocation:
    return records_pb2.Allocation(
        allocated=host_pb2.Resources(vcpus=usage.allocated.vcpus + reserved.vcpus,
                                     memory_bytes=usage.allocated.memory_bytes
                                     + reserved.memory_bytes),
        vm_count=usage.vm_count + 1)


def counted_from_cache(cache: VmCache, namespace: str) -> StoredAllocation:
    """A first usage record for a namespace that just got a quota, from the VMs this replica
    knows (revision 0: the create's transaction requires that there is none yet)."""
    usage = records_pb2.Allocation(allocated=host_pb2.Resources())
    for stored in cache.in_namespace(namespace):
        usage = plus(usage, stored.record.reserved)
    return StoredAllocation(usage, 0)
