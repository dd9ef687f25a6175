"""The etcd client against real etcd processes on loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from controller.etcd import (
    Compare,
    DeleteResult,
    EtcdClient,
    EtcdUnavailable,
    EventType,
    GetResult,
    NotLeader,
    Op,
    PutResult,
    WatchCompacted,
    WatchEvent,
    prefix_range_end,
)
from tools.fleet.etcd_server import EtcdCluster, EtcdServer, free_loopback_port

T = TypeVar("T")

# Upper bound for waits on something etcd does on its own schedule (lease expiry,
# a reconnect); reaching it fails the test, it is never a measurement.
PATIENCE = 15.0


async def take(items: AsyncIterator[T], count: int) -> list[T]:
    """The next `count` items, or a failure when they do not come."""
    async def collect() -> list[T]:
        return [await anext(items) for _ in range(count)]
    return await asyncio.wait_for(collect(), PATIENCE)


async def next_events(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    return await take(events, count)


def summary(events: list[WatchEvent]) -> list[tuple[EventType, str, bytes, int]]:
    return [(e.type, e.kv.key, e.kv.value, e.revision) for e in events]


async def eventually(check: Callable[[], Awaitable[bool]]) -> bool:
    """Whether `check` comes true within PATIENCE seconds, polling it."""
    for _ in range(int(PATIENCE / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def eventually_gone(etcd: EtcdClient, key: str) -> bool:
    async def gone() -> bool:
        return await etcd.get(key) is None
    return await eventually(gone)


# keys


async def test_put_get_delete(etcd_client: EtcdClient) -> None:
    first = await etcd_client.put("/vmm/vms/a", b"one")
    kv = await etcd_client.get("/vmm/vms/a")
    assert kv is not None
    assert (kv.key, kv.value, kv.version, kv.lease) == ("/vmm/vms/a", b"one", 1, 0)
    assert kv.create_revision == kv.mod_revision == first

    second = await etcd_client.put("/vmm/vms/a", b"two")
    kv = await etcd_client.get("/vmm/vms/a")
    assert kv is not None
    assert second > first
    assert (kv.value, kv.version, kv.create_revision, kv.mod_revision) == (b"two", 2, first, second)

    assert await etcd_client.delete("/vmm/vms/a") is True
    assert await etcd_client.get("/vmm/vms/a") is None
    assert await etcd_client.delete("/vmm/vms/a") is False


async def test_get_prefix_lists_only_the_prefix_in_key_order(etcd_client: EtcdClient) -> None:
    for key in ["/vmm/vms/b", "/vmm/vms/a", "/vmm/vmsx", "/vmm/hosts/h1"]:
        last = await etcd_client.put(key, key.encode())

    kvs, revision = await etcd_client.get_prefix("/vmm/vms/")

    assert [kv.key for kv in kvs] == ["/vmm/vms/a", "/vmm/vms/b"]
    assert [kv.value for kv in kvs] == [b"/vmm/vms/a", b"/vmm/vms/b"]
    assert revision == last
    assert await etcd_client.get_prefix("/nothing/") == ([], revision)


async def test_get_prefix_reads_every_page_at_one_revision(etcd_client: EtcdClient) -> None:
    # More keys than one page (500); etcd allows 128 operations per transaction.
    keys = [f"/many/{i:04d}" for i in range(1100)]
    for start in range(0, len(keys), 128):
        await etcd_client.txn([], [Op.put(k, b"x") for k in keys[start:start + 128]])

    kvs, revision = await etcd_client.get_prefix("/many/")

    assert [kv.key for kv in kvs] == keys
    assert revision == (await etcd_client.status()).revision


async def test_delete_prefix_counts_what_it_deleted(etcd_client: EtcdClient) -> None:
    for key in ["/vmm/vms/a", "/vmm/vms/b", "/vmm/vmsx"]:
        await etcd_client.put(key, b"")

    assert await etcd_client.delete_prefix("/vmm/vms/") == 2
    kvs, _ = await etcd_client.get_prefix("/vmm/vms/")
    assert kvs == []
    assert await etcd_client.get("/vmm/vmsx") is not None
    assert await etcd_client.delete_prefix("/vmm/vms/") == 0


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"
    assert prefix_range_end(b"") == b"\0"


# transactions


async def test_compare_and_swap_on_mod_revision(etcd_client: EtcdClient) -> None:
    created = await etcd_client.put("/vmm/vms/a", b"v1")

    swapped = await etcd_client.compare_and_swap("/vmm/vms/a", b"v2", created)
    assert swapped is not None and swapped > created

    # A writer that read before the swap loses, and changes nothing.
    assert await etcd_client.compare_and_swap("/vmm/vms/a", b"stale", created) is None
    kv = await etcd_client.get("/vmm/vms/a")
    assert kv is not None and (kv.value, kv.mod_revision) == (b"v2", swapped)

    assert await etcd_client.compare_and_delete("/vmm/vms/a", created) is False
    assert await etcd_client.compare_and_delete("/vmm/vms/a", swapped) is True
    assert await etcd_client.get("/vmm/vms/a") is None


async def test_create_only_if_absent(etcd_client: EtcdClient) -> None:
    revision = await etcd_client.create("/vmm/vms/a", b"first")
    assert revision is not None

    assert await etcd_client.create("/vmm/vms/a", b"second") is None
    kv = await etcd_client.get("/vmm/vms/a")
    assert kv is not None and (kv.value, kv.mod_revision) == (b"first", revision)


async def test_txn_runs_the_failure_branch_and_returns_its_reads(etcd_client: EtcdClient) -> None:
    revision = await etcd_client.put("/k", b"current")

    result = await etcd_client.txn(
        [Compare.mod_revision("/k") == revision - 1],
        [Op.put("/k", b"lost")],
        [Op.get("/k")],
    )

    assert result.succeeded is False
    assert result.revision == revision
    [read] = result.responses
    assert isinstance(read, GetResult)
    assert [(kv.key, kv.value) for kv in read.kvs] == [("/k", b"current")]


async def test_txn_success_branch_applies_every_operation(etcd_client: EtcdClient) -> None:
    await etcd_client.put("/k", b"x")
    await etcd_client.put("/old", b"")

    result = await etcd_client.txn(
        [Compare.value("/k") == b"x", Compare.version("/k") > 0, Compare.absent("/new"),
         Compare.lease("/k") == 0, Compare.create_revision("/old") != 0],
        [Op.put("/new", b"n"), Op.delete("/old"), Op.get_prefix("/n")],
    )

    assert result.succeeded is True
    put, delete, listing = result.responses
    assert isinstance(put, PutResult)
    assert delete == DeleteResult(deleted=1)
    assert isinstance(listing, GetResult) and [kv.key for kv in listing.kvs] == ["/new"]
    assert await etcd_client.get("/old") is None


def test_compare_checks_the_operand_type() -> None:
    with pytest.raises(TypeError):
        _ = Compare.value("/k") == 1
    with pytest.raises(TypeError):
        _ = Compare.mod_revision("/k") == b"1"
    with pytest.raises(TypeError):
        _ = Compare.version("/k") == True  # noqa: E712 - a bool is not a revision


# watches


async def test_watch_delivers_puts_and_deletes_with_revisions(etcd_client: EtcdClient) -> None:
    _, revision = await etcd_client.get_prefix("/vmm/vms/")
    events = etcd_client.watch_prefix("/vmm/vms/", start_revision=revision + 1, prev_kv=True)

    put_a = await etcd_client.put("/vmm/vms/a", b"1")
    await etcd_client.put("/vmm/other", b"not watched")
    put_a2 = await etcd_client.put("/vmm/vms/a", b"2")
    deleted = await etcd_client.txn([], [Op.delete("/vmm/vms/a")])

    got = await next_events(events, 3)
    await events.aclose()

    assert summary(got) == [
        (EventType.PUT, "/vmm/vms/a", b"1", put_a),
        (EventType.PUT, "/vmm/vms/a", b"2", put_a2),
        (EventType.DELETE, "/vmm/vms/a", b"", deleted.revision),
    ]
    assert got[0].prev_kv is None
    assert got[1].prev_kv is not None and got[1].prev_kv.value == b"1"
    assert got[2].prev_kv is not None and got[2].prev_kv.value == b"2"


async def test_watch_without_start_revision_sees_changes_after_it_starts(
        etcd_client: EtcdClient) -> None:
    before = await etcd_client.put("/w/before", b"")
    events = etcd_client.watch_prefix("/w/")
    # The watch starts at its first step, at a moment this test cannot see: write
    # until it reports a write, which must be one made after it started.
    first = asyncio.ensure_future(anext(events))
    for attempt in range(100):
        await etcd_client.put("/w/after", str(attempt).encode())
        await asyncio.wait([first], timeout=0.05)
        if first.done():
            break
    event = await asyncio.wait_for(first, PATIENCE)
    await events.aclose()

    assert event.kv.key == "/w/after"
    assert event.revision > before


@pytest.mark.parametrize("outage", ["restart", "kill"])
async def test_watch_resumes_across_an_etcd_restart(
        etcd_server: EtcdServer, etcd_client: EtcdClient, outage: str) -> None:
    _, revision = await etcd_client.get_prefix("/vmm/")
    events = etcd_client.watch_prefix("/vmm/", start_revision=revision + 1)
    before = [await etcd_client.put(f"/vmm/before/{i}", b"") for i in range(2)]
    assert [e.revision for e in await next_events(events, 2)] == before

    if outage == "restart":
        await asyncio.to_thread(etcd_server.restart)
    else:
        await asyncio.to_thread(etcd_server.kill)
        await asyncio.to_thread(etcd_server.start)
    # Written while the watch is (maybe still) disconnected: resuming must deliver them.
    async with EtcdClient([etcd_server.endpoint]) as writer:
        after = [await writer.put(f"/vmm/after/{i}", b"") for i in range(3)]

    got = await next_events(events, 3)
    await events.aclose()
    assert [(e.kv.key, e.revision) for e in got] == [
        (f"/vmm/after/{i}", revision) for i, revision in enumerate(after)]


async def test_watch_from_a_compacted_revision_raises(etcd_client: EtcdClient) -> None:
    first = await etcd_client.put("/c", b"1")
    await etcd_client.put("/c", b"2")
    latest = await etcd_client.put("/c", b"3")
    await etcd_client.compact(latest)

    with pytest.raises(WatchCompacted) as raised:
        await next_events(etcd_client.watch_prefix("/c", start_revision=first), 1)
    assert raised.value.compact_revision == latest


# endpoints and failover


async def test_fails_over_from_a_dead_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_loopback_port()}"
    async with EtcdClient([dead, etcd_server.endpoint], timeout=5.0) as etcd:
        revision = await etcd.put("/k", b"v")
        kv = await etcd.get("/k")
        assert kv is not None and kv.mod_revision == revision


async def test_raises_unavailable_when_no_endpoint_answers() -> None:
    dead = [f"127.0.0.1:{free_loopback_port()}", f"http://127.0.0.1:{free_loopback_port()}"]
    etcd = EtcdClient(dead, timeout=0.5)
    with pytest.raises(EtcdUnavailable) as raised:
        await etcd.connect()
    await etcd.close()
    assert dead[0] in str(raised.value)


async def test_raises_unavailable_while_etcd_is_down(
        etcd_server: EtcdServer, etcd_client: EtcdClient) -> None:
    async with EtcdClient([etcd_server.endpoint], timeout=0.5) as impatient:
        await impatient.put("/k", b"v")
        await asyncio.to_thread(etcd_server.kill)
        with pytest.raises(EtcdUnavailable):
            await impatient.get("/k")
        with pytest.raises(EtcdUnavailable):
            await impatient.put("/k", b"w")

    # Once etcd is back, the same connection works again.
    await asyncio.to_thread(etcd_server.start)
    kv = await etcd_client.get("/k")
    assert kv is not None and kv.value == b"v"


async def test_cluster_member_loss_keeps_calls_and_watches_going(
        etcd_cluster: EtcdCluster) -> None:
    async with EtcdClient(etcd_cluster.endpoints, timeout=5.0) as etcd:
        _, revision = await etcd.get_prefix("/vmm/")
        events = etcd.watch_prefix("/vmm/", start_revision=revision + 1)
        before = await etcd.put("/vmm/before", b"")
        assert [e.revision for e in await next_events(events, 1)] == [before]

        # The client talks to the first endpoint until it fails. A write racing
        # the failure may end "outcome unknown"; a read is retried elsewhere.
        await asyncio.to_thread(etcd_cluster.members[0].kill)
        kv = await etcd.get("/vmm/before")
        assert kv is not None and kv.mod_revision == before
        after = [await etcd.put(f"/vmm/after/{i}", b"") for i in range(2)]
        got = await next_events(events, 2)
        await events.aclose()
        status = await etcd.status()

    assert [e.revision for e in got] == after
    assert status.revision == after[-1]


# leases


async def test_lease_expiry_deletes_its_keys(etcd_client: EtcdClient) -> None:
    lease = await etcd_client.lease_grant(1)
    await etcd_client.put("/hosts/h1", b"alive", lease=lease)
    info = await etcd_client.lease_time_to_live(lease, keys=True)
    assert info is not None and info.granted_ttl == 1 and info.keys == ["/hosts/h1"]
    kv = await etcd_client.get("/hosts/h1")
    assert kv is not None and kv.lease == lease

    assert await eventually_gone(etcd_client, "/hosts/h1")
    assert await etcd_client.lease_time_to_live(lease) is None


async def test_keepalive_keeps_the_lease_and_exit_revokes_it(etcd_client: EtcdClient) -> None:
    async with etcd_client.lease(ttl=1) as lease:
        await etcd_client.put("/hosts/h1", b"alive", lease=lease.id)
        # Past the TTL a few times over: without keepalives the key would be gone.
        await asyncio.sleep(2.5)
        assert await etcd_client.get("/hosts/h1") is not None
        assert not lease.lost

    assert await etcd_client.get("/hosts/h1") is None
    assert await etcd_client.lease_time_to_live(lease.id) is None


async def test_keepalive_reports_a_lease_revoked_elsewhere(etcd_client: EtcdClient) -> None:
    lease_id = await etcd_client.lease_grant(3)
    async with etcd_client.keepalive(lease_id) as kept:
        await etcd_client.lease_revoke(lease_id)
        await asyncio.wait_for(kept.wait_lost(), PATIENCE)
        assert kept.lost
    # Revoking a lease that is already gone is not an error.
    await etcd_client.lease_revoke(lease_id)


async def test_keepalive_survives_an_etcd_restart(
        etcd_server: EtcdServer, etcd_client: EtcdClient) -> None:
    async with etcd_client.lease(ttl=1) as lease:
        await etcd_client.put("/hosts/h1", b"alive", lease=lease.id)
        await asyncio.to_thread(etcd_server.restart)
        # Past the TTL a few times over: the keepalives must have resumed.
        await asyncio.sleep(2.5)
        assert not lease.lost
        assert await etcd_client.get("/hosts/h1") is not None


# election


async def test_election_hands_over_on_resign_and_on_lease_loss(
        etcd_server: EtcdServer, etcd_client: EtcdClient) -> None:
    assert await etcd_client.leader("controller") is None
    announced: asyncio.Queue[bytes] = asyncio.Queue()

    async def observe() -> None:
        async for kv in etcd_client.observe("controller"):
            announced.put_nowait(kv.value)

    async def next_announcement() -> bytes:
        return await asyncio.wait_for(announced.get(), PATIENCE)

    observer = asyncio.create_task(observe())
    async with EtcdClient([etcd_server.endpoint]) as second, \
            EtcdClient([etcd_server.endpoint]) as third:
        lease_a = await etcd_client.lease_grant(30)
        lease_b = await second.lease_grant(30)
        lease_c = await third.lease_grant(30)

        leader_a = await etcd_client.campaign("controller", b"a", lease_a)
        campaign_b = asyncio.create_task(second.campaign("controller", b"b", lease_b))
        await asyncio.sleep(0.1)  # b queues before c
        campaign_c = asyncio.create_task(third.campaign("controller", b"c", lease_c))
        current = await etcd_client.leader("controller")
        assert current is not None and current.value == b"a"
        assert current.key == leader_a.key and current.lease == lease_a
        assert await next_announcement() == b"a"

        await etcd_client.proclaim(leader_a, b"a2")
        current = await etcd_client.leader("controller")
        assert current is not None and current.value == b"a2"
        assert await next_announcement() == b"a2"

        await asyncio.sleep(0.1)
        assert not campaign_b.done() and not campaign_c.done()
        await etcd_client.resign(leader_a)
        leader_b = await asyncio.wait_for(campaign_b, PATIENCE)
        current = await etcd_client.leader("controller")
        assert current is not None and (current.value, current.key) == (b"b", leader_b.key)
        assert not campaign_c.done()
        with pytest.raises(NotLeader):
            await etcd_client.proclaim(leader_a, b"stale")
        assert await next_announcement() == b"b"

        # The leader's lease ends (as when its controller dies): c takes over.
        await second.lease_revoke(lease_b)
        leader_c = await asyncio.wait_for(campaign_c, PATIENCE)
        current = await etcd_client.leader("controller")
        assert current is not None and (current.value, current.key) == (b"c", leader_c.key)
        assert await next_announcement() == b"c"

    observer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await observer


async def test_cancelled_campaign_withdraws_the_candidate(etcd_client: EtcdClient) -> None:
    lease_a = await etcd_client.lease_grant(30)
    lease_b = await etcd_client.lease_grant(30)
    leader_a = await etcd_client.campaign("election", b"a", lease_a)
    waiting = asyncio.create_task(etcd_client.campaign("election", b"b", lease_b))
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    await etcd_client.resign(leader_a)

    # b withdrew, so nobody leads now.
    async def nobody_leads() -> bool:
        return await etcd_client.leader("election") is None
    assert await eventually(nobody_leads)


# health


async def test_status(etcd_client: EtcdClient) -> None:
    revision = await etcd_client.put("/k", b"")
    status = await etcd_client.status()
    version, leader_id, current = status
    assert version.startswith("3.")
    assert leader_id != 0
    assert current == revision
