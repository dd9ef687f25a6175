"""VM networking on the host, through the whole system with real netlink: the agent makes
each managed NIC's TAP on its bridge before QEMU opens it and removes it with the VM, and
after crashes it keeps what a VM it adopts still needs and removes the rest.

Every bridge and host id here is unique to the test run, so the TAP names (derived from
the agent's id) never meet another run's; the fixtures remove what a failed test left.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from pyroute2 import IPRoute

from agent.network import links
from agent.network.links import IFF_MULTI_QUEUE, tun_flags
from agent.network.names import TAP_PREFIX, parse_alias, tap_alias, tap_name
from tools.fleet.cluster import GIB, Cluster, wait_until
from tools.guests.images import (
    LINUX_GUEST_NET_MARKER,
    LINUX_GUEST_PING_MARKER,
    LinuxGuest,
    TinyGuest,
)
from vmm.v1 import network_pb2, network_pb2_grpc, vm_pb2

pytestmark = pytest.mark.qemu

S = vm_pb2
MIB = 1 << 20


def needs_root() -> None:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        pytest.skip("needs root and /dev/net/tun to make bridges and TAP devices")


def make_bridge(mtu: int = 0) -> str:
    name = f"vtb{secrets.token_hex(5)}"
    links.ensure_bridge(name, mtu)
    return name


def own_taps(host_id: str) -> set[str]:
    return {tap for tap, alias in links.taps_with_prefix(TAP_PREFIX).items()
            if parse_alias(alias).get("owner") == host_id}


def free_test_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.213.0.0/16 that no route of this host covers."""
    with IPRoute() as ip:
        routed = [ipaddress.IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}")
                  for r in ip.get_routes(family=socket.AF_INET) if r.get("RTA_DST")]
    while True:
        subnet = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(r) for r in routed):
            return subnet


@dataclass
class NetHost:
    """One QEMU agent on bridges made for this module, one of them with a fleet network
    and the host's address on it."""

    cluster: Cluster
    host_id: str
    mgmt: str
    data: str
    network: network_pb2.Network


@pytest.fixture(scope="module")
def net_host(qemu_binary: str) -> Iterator[NetHost]:
    """Bridges first (the agent reports those its host has when it registers), then etcd,
    the controller and the agent. Everything it made goes, however the tests ended."""
    needs_root()
    host_id = f"net-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix="vmm-net-"))
    cluster = Cluster(workdir, operation_timeout=90)
    bridges: list[str] = []
    try:
        bridges += [make_bridge(), make_bridge(mtu=9000), make_bridge()]
        subnet = free_test_subnet()
        gateway = str(next(subnet.hosts()))
        with IPRoute() as ip:
            ip.addr("add", index=ip.link_lookup(ifname=bridges[2])[0], address=gateway,
                    prefixlen=subnet.prefixlen)
        cluster.start()
        cluster.add_agent(host_id, vcpus=4, memory=4 * GIB,
                          backends="qemu,cloud-hypervisor,firecracker")
        network = network_pb2.Network(name=f"n{secrets.token_hex(4)}", bridge=bridges[2],
                                      cidr=str(subnet), gateway=gateway)
        network_pb2_grpc.NetworkServiceStub(cluster.channel).CreateNetwork(
            network_pb2.CreateNetworkRequest(network=network))
        yield NetHost(cluster, host_id, bridges[0], bridges[1], network)
    finally:
        cluster.close()
        for tap in own_taps(host_id):
            links.remove_link(tap)
        for bridge in bridges:
            links.remove_link(bridge)
        shutil.rmtree(workdir, ignore_errors=True)


def tiny_config(tiny: TinyGuest, *nics: vm_pb2.NetworkInterface) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=32 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(tiny.pvh32),
                               boot_options={"ready_marker": tiny.marker}),
        network=list(nics))


def create_and_boot(cluster: Cluster, vm_id: str, config: vm_pb2.VmConfig) -> None:
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                          backend="qemu"))
    assert created.state == S.VM_STATE_CREATED
    assert cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id)).state == S.VM_STATE_RUNNING


def nics_of(cluster: Cluster, vm_id: str) -> dict[str, vm_pb2.NetworkInterfaceStatus]:
    info = cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id))
    return {nic.id: nic for nic in info.network_interfaces}


def sysfs(tap: str, attribute: str) -> str:
    return Path("/sys/class/net", tap, attribute).read_text().strip()


def master_of(tap: str) -> str:
    return Path("/sys/class/net", tap, "master").resolve().name


def delete_and_wait_gone(cluster: Cluster, vm_id: str) -> None:
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True))

    def gone() -> bool:
        return not any(v.vm_id == vm_id for v in cluster.vms.ListVms(
            vm_pb2.ListVmsRequest()).vms)
    wait_until(gone, 30, what=f"{vm_id} to be deleted")


def leftovers(tap_index: int) -> list[object]:
    """Routes and addresses still naming a removed TAP's interface index."""
    with IPRoute() as ip:
        return [*ip.get_addr(index=tap_index),
                *(r for r in ip.get_routes(family=0) if r.get("RTA_OIF") == tap_index)]


def tap_index(tap: str) -> int:
    return int(sysfs(tap, "ifindex"))


def egress_rate(tap: str) -> int | None:
    """Bytes/s of the token bucket on the TAP's egress, None without one."""
    with IPRoute() as ip:
        for qdisc in ip.get_qdiscs(tap_index(tap)):
            if qdisc.get_attr("TCA_KIND") == "tbf":
                return int(qdisc.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")["rate"])
    return None


# ---- tests ------------------------------------------------------------------------------


def test_two_nics_get_taps_on_their_bridges_while_the_vm_runs_and_none_after_delete(
        net_host: NetHost, tiny: TinyGuest, kvm: None) -> None:
    cluster, host_id, mgmt, data = net_host.cluster, net_host.host_id, net_host.mgmt, net_host.data
    config = tiny_config(
        tiny,
        # QEMU has no rate limit of its own: the agent shapes the TAP (10 Mbit/s).
        vm_pb2.NetworkInterface(id="eth0", tap_device=mgmt,
                                options={"rate_limit_bandwidth": "1250000"}),
        # Two queue pairs: QEMU opens the TAP multi-queue, so it must be made so.
        vm_pb2.NetworkInterface(id="eth1", tap_device=data, mtu=1400,
                                mac_address="02:aa:bb:cc:dd:01", options={"num_queues": "2"}))
    create_and_boot(cluster, "two-nics", config)

    nics = nics_of(cluster, "two-nics")
    assert set(nics) == {"eth0", "eth1"}
    for nic_id, bridge, mtu in (("eth0", mgmt, "1500"), ("eth1", data, "1400")):
        nic = nics[nic_id]
        assert nic.managed and nic.bridge == bridge
        assert nic.tap_device == tap_name(host_id, "two-nics", nic_id)
        assert len(nic.tap_device) <= 15 and nic.tap_device.startswith(TAP_PREFIX)
        assert master_of(nic.tap_device) == bridge
        assert sysfs(nic.tap_device, "mtu") == mtu
        assert sysfs(nic.tap_device, "owner") == str(os.geteuid())
        # QEMU holds the TAP open: it has carrier, which a TAP nobody opened lacks.
        assert sysfs(nic.tap_device, "carrier") == "1"
    assert nics["eth1"].mac_address == "02:aa:bb:cc:dd:01"
    assert tun_flags(nics["eth1"].tap_device) & IFF_MULTI_QUEUE
    assert not tun_flags(nics["eth0"].tap_device) & IFF_MULTI_QUEUE
    assert egress_rate(nics["eth0"].tap_device) == 1250000
    assert egress_rate(nics["eth1"].tap_device) is None
    derived = nics["eth0"].mac_address
    assert int(derived[:2], 16) & 0b11 == 0b10  # locally administered, unicast
    qemu_cmdline = " ".join(psutil.Process(int(cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(
        vm_id="two-nics")).backend_info["pid"])).cmdline())
    assert derived in qemu_cmdline and nics["eth0"].tap_device in qemu_cmdline

    indexes = [tap_index(nic.tap_device) for nic in nics.values()]
    delete_and_wait_gone(cluster, "two-nics")
    assert own_taps(host_id) == set()
    for nic in nics.values():
        assert links.link_kind(nic.tap_device) is None
    assert all(not leftovers(i) for i in indexes)
    # The bridges are the administrator's: they stay.
    assert links.is_bridge(mgmt) and links.is_bridge(data)


def test_an_existing_tap_is_used_as_it_is_and_kept(
        net_host: NetHost, tiny: TinyGuest, kvm: None) -> None:
    cluster, bridge = net_host.cluster, net_host.mgmt
    mine = f"vtt{secrets.token_hex(5)}"
    links.ensure_tap(links.TapSpec(name=mine, bridge=bridge))
    try:
        create_and_boot(cluster, "own-tap", tiny_config(
            tiny, vm_pb2.NetworkInterface(id="eth0", tap_device=mine)))
        nic = nics_of(cluster, "own-tap")["eth0"]
        assert not nic.managed and nic.tap_device == mine
        assert sysfs(mine, "carrier") == "1"
        delete_and_wait_gone(cluster, "own-tap")
        assert links.link_kind(mine) == "tun"
    finally:
        links.remove_link(mine)


# ---- fleet networks and real guests ---------------------------------------------------------


def icmp_echo(address: str, timeout: float) -> bool:
    """One ICMP echo request from the host; True when the address answers in time."""
    ident, payload = secrets.randbelow(0xFFFF), b"vmm-net-test"

    def checksum(data: bytes) -> int:
        total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (address, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, (source, _) = sock.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = data[(data[0] & 0x0F) * 4:]
            if source == address and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    return False


def test_a_nic_the_host_cannot_set_up_fails_the_create_and_leaves_no_tap(
        net_host: NetHost, tiny: TinyGuest, kvm: None) -> None:
    """A VLAN port needs the kernel's bridge VLAN filtering: where it is missing the create
    fails naming the NIC, and the TAP made for it is gone again."""
    cluster, host_id, bridge = net_host.cluster, net_host.host_id, net_host.mgmt
    config = tiny_config(tiny, vm_pb2.NetworkInterface(id="eth0", tap_device=bridge, vlan=42))
    tap = tap_name(host_id, "vlan-vm", "eth0")
    if Path("/sys/class/net", bridge, "bridge", "vlan_filtering").exists():
        create_and_boot(cluster, "vlan-vm", config)
        assert master_of(tap) == bridge
        delete_and_wait_gone(cluster, "vlan-vm")
    else:
        with pytest.raises(grpc.RpcError) as failed:
            cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="vlan-vm", config=config,
                                                        backend="qemu"))
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "network interface eth0" in failed.value.details()
        wait_until(lambda: not any(v.vm_id == "vlan-vm" for v in cluster.vms.ListVms(
            vm_pb2.ListVmsRequest()).vms), 30, what="the failed VM to be undone")
    assert links.link_kind(tap) is None
    assert own_taps(host_id) == set()


def test_hotplugged_nics_get_a_tap_before_the_device_and_lose_it_after(
        net_host: NetHost, tiny: TinyGuest, kvm: None) -> None:
    cluster, host_id = net_host.cluster, net_host.host_id
    for vm_id, backend, boot_options in (
            ("hot-qemu", "qemu", {"machine": "q35"}), ("hot-ch", "cloud-hypervisor", {})):
        config = tiny_config(tiny)
        config.boot.boot_options.update(boot_options)
        if backend == "cloud-hypervisor":
            config.boot.kernel_path = str(tiny.elf64)
            config.boot.boot_options.pop("ready_marker")
            config.memory.size_bytes = 512 * MIB  # the simulator's smallest
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id=vm_id, config=config,
                                                    backend=backend))
        cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id=vm_id))
        tap = tap_name(host_id, vm_id, "hot0")
        assert links.link_kind(tap) is None
        cluster.vms.AttachNetworkInterface(vm_pb2.AttachNetworkInterfaceRequest(
            vm_id=vm_id, interface=vm_pb2.NetworkInterface(id="hot0", tap_device=net_host.mgmt)))
        assert master_of(tap) == net_host.mgmt
        assert nics_of(cluster, vm_id)["hot0"].tap_device == tap
        if backend == "qemu":
            # The hot-added device holds the TAP open. (QEMU's unplug waits for the guest to
            # let the device go, which the tiny guest never does: the VM's delete removes it.)
            assert sysfs(tap, "carrier") == "1"
        else:
            cluster.vms.DetachNetworkInterface(vm_pb2.DetachNetworkInterfaceRequest(
                vm_id=vm_id, interface_id="hot0"))
            assert links.link_kind(tap) is None
        delete_and_wait_gone(cluster, vm_id)
        assert links.link_kind(tap) is None
    assert own_taps(host_id) == set()


def test_a_firecracker_guest_learns_its_address_from_mmds_and_the_command_line(
        net_host: NetHost, tiny: TinyGuest) -> None:
    cluster, network = net_host.cluster, net_host.network
    config = tiny_config(tiny, vm_pb2.NetworkInterface(id="eth0", network=network.name))
    config.boot.kernel_path = str(tiny.elf64)
    config.boot.kernel_args = "console=ttyS0"
    config.memory.size_bytes = 128 * MIB
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="fc-net", config=config,
                                                backend="firecracker"))
    info = cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="fc-net"))
    nic = nics_of(cluster, "fc-net")["eth0"]
    address = ipaddress.IPv4Interface(nic.ip_address)
    with httpx.Client(transport=httpx.HTTPTransport(uds=info.backend_info["api_socket"])) as api:
        mmds = api.get("http://localhost/mmds").json()
        boot_args = api.get("http://localhost/vm/config").json()["boot-source"]["boot_args"]
    assert mmds["vmm"]["network_interfaces"] == [{
        "id": "eth0", "mac_address": nic.mac_address, "ip_address": nic.ip_address,
        "gateway": network.gateway, "mtu": 0, "network": network.name}]
    assert f"ip={address.ip}::{network.gateway}:{address.netmask}::eth0:off" in boot_args
    assert master_of(nic.tap_device) == network.bridge
    delete_and_wait_gone(cluster, "fc-net")
    assert links.link_kind(nic.tap_device) is None


def linux_on(linux: LinuxGuest, network: str, kernel_args: str = "") -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1),
        memory=vm_pb2.MemoryConfig(size_bytes=256 * MIB),
        boot=vm_pb2.BootConfig(kernel_path=str(linux.bzimage), initrd_path=str(linux.initramfs),
                               kernel_args=f"{linux.cmdline} {kernel_args}".strip(),
                               boot_options={"ready_marker": linux.marker}),
        network=[vm_pb2.NetworkInterface(id="eth0", network=network)])


def console(cluster: Cluster, vm_id: str) -> str:
    return cluster.vms.GetConsoleLog(vm_pb2.GetConsoleLogRequest(vm_id=vm_id)).text


def test_linux_guests_get_addresses_answer_the_host_and_reach_each_other(
        net_host: NetHost, linux: LinuxGuest) -> None:
    cluster, network = net_host.cluster, net_host.network

    def create(vm_id: str, kernel_args: str = "") -> str:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(
            vm_id=vm_id, config=linux_on(linux, network.name, kernel_args), backend="qemu"))
        stored = cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id=vm_id)).config
        return stored.network[0].ip_address.split("/")[0]

    # The controller hands out the addresses at create, so the second guest can be told
    # the first one's before either boots; both boot at once.
    first_address = create("web-1")
    second_address = create("web-2", f"vmm.ping={first_address}")
    with ThreadPoolExecutor(2) as pool:
        booted = list(pool.map(lambda vm_id: cluster.vms.BootVm(
            vm_pb2.BootVmRequest(vm_id=vm_id)).state, ["web-1", "web-2"]))
    assert booted == [S.VM_STATE_RUNNING, S.VM_STATE_RUNNING]

    subnet = ipaddress.IPv4Network(network.cidr)
    nics = {vm_id: nics_of(cluster, vm_id)["eth0"] for vm_id in ("web-1", "web-2")}
    for vm_id, address in (("web-1", first_address), ("web-2", second_address)):
        nic = nics[vm_id]
        assert nic.ip_address == f"{address}/{subnet.prefixlen}" and nic.network == network.name
        assert ipaddress.IPv4Address(address) in subnet and address != network.gateway
        assert master_of(nic.tap_device) == network.bridge
        assert f"{LINUX_GUEST_NET_MARKER} eth0 {address} {subnet.netmask}" in console(
            cluster, vm_id)
        # The host reaches each guest through the bridge it has its address on.
        assert any(icmp_echo(address, 2.0) for _ in range(5)), console(cluster, vm_id)
    assert first_address != second_address
    wait_until(lambda: f"{LINUX_GUEST_PING_MARKER} {first_address}" in console(
        cluster, "web-2"), 60, what="web-2 to reach web-1")

    for vm_id in ("web-1", "web-2"):
        delete_and_wait_gone(cluster, vm_id)
    assert all(links.link_kind(nic.tap_device) is None for nic in nics.values())
    described = network_pb2_grpc.NetworkServiceStub(cluster.channel).GetNetwork(
        network_pb2.GetNetworkRequest(name=network.name)).network
    assert described.allocated_addresses == 0 and described.host_count == 1


def test_crashed_agent_and_hypervisor_leave_no_tap_and_orphans_go_at_start(
        net_host: NetHost, tiny: TinyGuest, kvm: None) -> None:
    cluster, host_id, bridge = net_host.cluster, net_host.host_id, net_host.mgmt
    create_and_boot(cluster, "crashy", tiny_config(
        tiny, vm_pb2.NetworkInterface(id="eth0", tap_device=bridge)))
    tap = nics_of(cluster, "crashy")["eth0"].tap_device
    index = tap_index(tap)
    # A TAP of this agent's naming whose VM this host no longer has.
    orphan = tap_name(host_id, "ghost", "eth0")
    links.ensure_tap(links.TapSpec(name=orphan, bridge=bridge,
                                   alias=tap_alias(host_id, "ghost", "eth0")))
    qemu = int(cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="crashy"))
               .backend_info["pid"])

    agent = cluster.agents[host_id]
    agent.signal(signal.SIGKILL)
    os.kill(qemu, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(qemu) or psutil.Process(qemu).status()
               == psutil.STATUS_ZOMBIE, 10, what="QEMU to die")
    agent.start()
    cluster.wait_host_ready(host_id)

    # The orphan went at start; the VM the agent adopted (failed now) keeps its TAP.
    wait_until(lambda: links.link_kind(orphan) is None, 10, what="the orphan TAP to go")
    assert "removed tap " + orphan in agent.log.read_text()
    assert links.link_kind(tap) == "tun"
    assert own_taps(host_id) == {tap}

    delete_and_wait_gone(cluster, "crashy")
    assert own_taps(host_id) == set()
    assert not leftovers(index)
