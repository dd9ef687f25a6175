"""ListHosts pages like ListVms: a fleet of 2,500 registered hosts listed by a client with
gRPC's default 4 MiB receive limit, with and without backend capabilities; and `vmmctl hosts`
following the pages."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner, Result

from controller.api.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_BYTES, MAX_PAGE_SIZE
from tests.support.api import bad_fields
from tools.fleet.cluster import Cluster, wait_until
from tools.fleet.hollow import HollowFleet, HollowFleetConfig, host_id
from tools.vmmctl import cli as vmmctl
from vmm import features
from vmm.v1 import host_pb2, vm_pb2, vm_pb2_grpc

HOSTS = 2500
PREFIX = "pg-"
DEFAULT_RECEIVE_LIMIT = 4 << 20
EXPECTED = [host_id(PREFIX, n) for n in range(1, HOSTS + 1)]


def register_hosts(address: str, count: int) -> None:
    """Register `count` hosts through the agent protocol, then drop their streams: the
    controller keeps their records (the hosts are then DOWN), which is all a listing needs."""

    async def run() -> None:
        config = HollowFleetConfig(controller=address, hosts=count, prefix=PREFIX)
        async with HollowFleet(config) as fleet:
            await fleet.wait_connected(timeout=120)

    asyncio.run(run())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("host-paging"))
    try:
        cluster.start()
        register_hosts(cluster.address, HOSTS)

        def all_listed() -> bool:
            response = cluster.hosts.ListHosts(host_pb2.ListHostsRequest(page_size=1))
            return response.total_count == HOSTS

        wait_until(all_listed, timeout=60, interval=0.2, what=f"{HOSTS} hosts listed")
        yield cluster
    finally:
        cluster.close()


def list_all(cluster: Cluster, request: host_pb2.ListHostsRequest
             ) -> list[host_pb2.ListHostsResponse]:
    """Every page of a listing, following next_page_token."""
    pages: list[host_pb2.ListHostsResponse] = []
    while True:
        page = cluster.hosts.ListHosts(request, timeout=30)
        pages.append(page)
        if not page.next_page_token:
            return pages
        assert len(pages) <= HOSTS, "the listing does not end"
        request.page_token = page.next_page_token


def listed_ids(pages: list[host_pb2.ListHostsResponse]) -> list[str]:
    return [h.host_id for page in pages for h in page.hosts]


def test_default_pages_list_every_host_once_without_capabilities(fleet: Cluster) -> None:
    pages = list_all(fleet, host_pb2.ListHostsRequest())

    assert listed_ids(pages) == EXPECTED  # each exactly once, in id order
    assert len(pages) == HOSTS // DEFAULT_PAGE_SIZE
    assert {len(p.hosts) for p in pages} == {DEFAULT_PAGE_SIZE}
    assert {p.total_count for p in pages} == {HOSTS}
    assert max(p.ByteSize() for p in pages) < DEFAULT_RECEIVE_LIMIT // 10
    host = pages[0].hosts[0]
    assert [b.name for b in host.backends] == list(features.BACKENDS)
    assert host.capacity.vcpus > 0 and host.registered_timestamp > 0
    assert not any(b.HasField("capabilities") for p in pages for h in p.hosts
                   for b in h.backends)


def test_capabilities_are_included_when_asked_and_pages_stay_small(fleet: Cluster) -> None:
    pages = list_all(fleet, host_pb2.ListHostsRequest(page_size=MAX_PAGE_SIZE,
                                                      include_capabilities=True))

    assert listed_ids(pages) == EXPECTED
    assert {p.total_count for p in pages} == {HOSTS}
    # A thousand hosts with three backends' capabilities would be ~7 MB: the page ends
    # early at the byte budget instead, well inside the client's limit.
    assert len(pages[0].hosts) < MAX_PAGE_SIZE
    assert max(p.ByteSize() for p in pages) <= MAX_PAGE_BYTES < DEFAULT_RECEIVE_LIMIT
    for page in pages:
        for host in page.hosts:
            assert [len(b.capabilities.features) > 0 for b in host.backends] == [True] * 3
    assert pages[0].hosts[0].backends[0].capabilities.backend == features.BACKENDS[0]


def test_a_page_size_over_the_maximum_is_read_as_the_maximum(fleet: Cluster) -> None:
    page = fleet.hosts.ListHosts(host_pb2.ListHostsRequest(page_size=MAX_PAGE_SIZE * 5))

    assert len(page.hosts) == MAX_PAGE_SIZE
    assert page.next_page_token
    assert [h.host_id for h in page.hosts] == EXPECTED[:MAX_PAGE_SIZE]


def test_small_pages_continue_where_the_last_ended(fleet: Cluster) -> None:
    first = fleet.hosts.ListHosts(host_pb2.ListHostsRequest(page_size=3))
    second = fleet.hosts.ListHosts(host_pb2.ListHostsRequest(
        page_size=3, page_token=first.next_page_token))

    assert [h.host_id for h in [*first.hosts, *second.hosts]] == EXPECTED[:6]


@pytest.mark.parametrize("token", [
    "not-a-token!",
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    # A ListVms token (the base64 of a VM id) is not a host listing's.
    base64.urlsafe_b64encode(b"vm-1").decode(),
])
def test_a_bad_page_token_is_invalid_argument_naming_the_field(fleet: Cluster,
                                                              token: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fleet.hosts.ListHosts(host_pb2.ListHostsRequest(page_token=token))

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err.value) == ["page_token"]


def test_a_negative_page_size_is_invalid_argument(fleet: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fleet.hosts.ListHosts(host_pb2.ListHostsRequest(page_size=-1))

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err.value) == ["page_size"]


def test_backend_capabilities_and_one_host_are_served_in_full(fleet: Cluster) -> None:
    started = time.monotonic()
    matrix = fleet.hosts.GetBackendCapabilities(host_pb2.GetBackendCapabilitiesRequest())
    qemu = fleet.hosts.GetBackendCapabilities(host_pb2.GetBackendCapabilitiesRequest(
        backend="qemu"))
    host = fleet.hosts.GetHost(host_pb2.GetHostRequest(host_id=EXPECTED[-1])).host

    assert [b.backend for b in matrix.backends] == list(features.BACKENDS)
    assert all(b.features for b in matrix.backends)
    assert [b.backend for b in qemu.backends] == ["qemu"]
    assert host.host_id == EXPECTED[-1]
    assert all(b.capabilities.features for b in host.backends)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- vmmctl


def run(cluster: Cluster, *args: str) -> Result:
    return CliRunner().invoke(vmmctl.app, ["--server", cluster.address, *args],
                              env={"VMM_TOKEN": None, "VMM_CA_CERT": None})


def test_vmmctl_hosts_follows_every_page(fleet: Cluster, tmp_path: Path) -> None:
    result = run(fleet, "hosts", "--page-size", "700")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["HOST", "HEALTH", "BACKENDS"]
    assert [line.split()[0] for line in lines[1:] if line.startswith(PREFIX)] == EXPECTED
    assert "DOWN" in lines[1]
    assert result.stderr == ""


def test_vmmctl_hosts_json_with_capabilities(fleet: Cluster) -> None:
    result = run(fleet, "-o", "json", "hosts", "--capabilities", "--limit", "600")

    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [h["host_id"] for h in listing["hosts"]] == EXPECTED[:600]
    assert listing["total_count"] == HOSTS
    assert listing["next_page_token"]
    assert all(b["capabilities"]["features"] for b in listing["hosts"][0]["backends"])


def test_vmmctl_hosts_limit_stops_early_and_says_so(fleet: Cluster) -> None:
    result = run(fleet, "hosts", "--limit", "250", "--page-size", "100")

    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith(PREFIX)]
    assert rows == EXPECTED[:250]
    assert f"Showing 250 of {HOSTS} hosts" in result.stderr


class PagedVms(vm_pb2_grpc.VmServiceServicer):
    """ListVms over a fixed list, pages as the real one (token: the last id returned)."""

    def __init__(self, count: int) -> None:
        self.ids = [f"vm-{n:04d}" for n in range(count)]
        self.requests: list[vm_pb2.ListVmsRequest] = []

    def ListVms(self, request: vm_pb2.ListVmsRequest,
                context: grpc.ServicerContext) -> vm_pb2.ListVmsResponse:
        self.requests.append(request)
        rest = [i for i in self.ids if i > request.page_token]
        page = rest[:request.page_size or DEFAULT_PAGE_SIZE]
        return vm_pb2.ListVmsResponse(
            vms=[vm_pb2.VmInfo(vm_id=i, state=vm_pb2.VM_STATE_RUNNING) for i in page],
            next_page_token=page[-1] if len(rest) > len(page) else "",
            total_count=len(self.ids))


@pytest.fixture
def vm_server() -> Iterator[tuple[str, PagedVms]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service = PagedVms(250)
    vm_pb2_grpc.add_VmServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(0)


def test_vmmctl_list_follows_every_page_unless_told_otherwise(
        vm_server: tuple[str, PagedVms]) -> None:
    address, service = vm_server
    runner = CliRunner()
    env: dict[str, str | None] = {"VMM_TOKEN": None, "VMM_CA_CERT": None}

    every = runner.invoke(vmmctl.app, ["--server", address, "-o", "json", "list"], env=env)
    limited = runner.invoke(vmmctl.app, ["--server", address, "list", "--limit", "120"],
                            env=env)

    assert every.exit_code == 0, every.output
    listing = json.loads(every.stdout)
    assert [vm["vm_id"] for vm in listing["vms"]] == service.ids
    assert listing["total_count"] == 250
    assert limited.exit_code == 0, limited.output
    assert sum(line.startswith("vm-") for line in limited.stdout.splitlines()) == 120
    assert "Showing 120 of 250 VMs" in limited.stderr
    assert [r.page_size for r in service.requests] == [0, 0, 0, 120]
