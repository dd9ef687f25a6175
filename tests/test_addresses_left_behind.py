"""Addresses taken for NICs that no VM was ever stored with (a controller killed between
taking an address and storing its VM, or between taking it and recording a hot-added NIC)
are given back after the grace, against a real etcd; addresses VMs hold, or taken a
moment ago, are not."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator

from controller.etcd import EtcdClient
from controller.networks import Networks
from controller.store import Store
from controller.vm_cache import VmCache
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, network_pb2

GRACE = 0.3


async def store_vm(store: Store, vm_id: str, nics: list[tuple[str, str]]) -> None:
    """A VM on host h1 whose NICs hold (network, address), committed as a placement does."""
    record = records_pb2.VmRecord(vm_id=vm_id, host_id="h1", generation=1,
                                  reserved=host_pb2.Resources(vcpus=1))
    for network, address in nics:
        record.config.network.add(id="eth0", network=network, ip_address=address)
    allocation = await store.get_allocation("h1")
    created = await store.create_vms(
        "h1", [record], allocation,
        records_pb2.Allocation(vm_count=allocation.allocation.vm_count + 1))
    assert created.created


async def held(etcd: EtcdClient) -> set[str]:
    kvs, _ = await etcd.get_prefix("/vmm/addresses/pool/")
    return {kv.key.rsplit("/", 1)[1] for kv in kvs}


@contextlib.asynccontextmanager
async def pool(etcd: EtcdClient, cidr: str) -> AsyncIterator[tuple[Store, VmCache, Networks]]:
    """A replica's store, VM cache and networks, with network "pool" on cidr."""
    store = Store(etcd)
    cache = VmCache(store)
    networks = Networks(store, cache, orphan_grace=GRACE)
    await cache.start()
    await networks.start()
    try:
        assert await networks.create(network_pb2.Network(name="pool", bridge="br-pool",
                                                         cidr=cidr))
        yield store, cache, networks
    finally:
        await networks.stop()
        await cache.stop()


async def test_only_addresses_no_vm_holds_are_given_back_and_only_after_the_grace(
        etcd_client: EtcdClient) -> None:
    async with pool(etcd_client, "10.88.0.0/24") as (store, cache, networks):
        kept = await networks.allocate("pool", "vm-kept/eth0")
        await store_vm(store, "vm-kept", [("pool", str(kept))])
        ghost = await networks.allocate("pool", "vm-never-stored/eth0")
        # A NIC hot-added to a stored VM whose record never got it.
        await store_vm(store, "vm-hot", [])
        hot = await networks.allocate("pool", "vm-hot/eth1")
        await cache.wait_for("vm-hot", lambda s: s is not None, 10)
        addresses = {str(a.ip) for a in (kept, ghost, hot)}
        assert await held(etcd_client) == addresses

        # Within the grace nothing is judged: a create may still be about to store its VM.
        networks.prune()
        assert await networks.reclaim_left_behind() == 0
        assert await held(etcd_client) == addresses

        await asyncio.sleep(GRACE + 0.1)
        networks.prune()
        assert set(networks.left_behind) == {f"pool/{ghost.ip}", f"pool/{hot.ip}"}
        assert await networks.reclaim_left_behind() == 2
        assert await held(etcd_client) == {str(kept.ip)}
        assert networks.left_behind == {}
        # Given back for good: the next allocations can take them again.
        assert int(ghost.ip) not in networks.taken["pool"]
        assert int(hot.ip) not in networks.taken["pool"]


async def test_an_address_whose_vm_appears_meanwhile_stays(etcd_client: EtcdClient) -> None:
    """Judged left behind, but the VM holding it is stored before the leader acts: the
    compare on the VM key keeps the address."""
    async with pool(etcd_client, "10.89.0.0/24") as (store, _cache, networks):
        late = await networks.allocate("pool", "vm-late/eth0")
        await asyncio.sleep(GRACE + 0.1)
        networks.prune()
        assert set(networks.left_behind) == {f"pool/{late.ip}"}
        # The VM is stored by another replica; this replica's watch may not have brought it.
        await store_vm(store, "vm-late", [("pool", str(late))])
        assert await networks.reclaim_left_behind() == 0
        assert str(ipaddress.IPv4Interface(late).ip) in await held(etcd_client)
