"""VM networking on the host, through the whole system with real netlink: the agent makes
each managed NIC's TAP on its bridge before QEMU opens it and removes it with the VM, and
after crashes it keeps what a VM it adopts still needs and removes the rest.

Every bridge and host id here is unique to the test run, so the TAP names (derived from
the agent's id) never meet another run's; the fixtures remove what a failed test left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pyroute2 import IPRoute

from agent.network import links
from agent.network.names import TAP_PREFIX, parse_alias, tap_alias, tap_name
from tools.fleet.cluster import GIB, Cluster, wait_until
from tools.guests.images import TinyGuest
from vmm.v1 import vm_pb2

pytestmark = pytest.mark.qemu

S = vm_pb2
MIB = 1 << 20


def needs_root() -> None:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        pytest.skip("needs root and /dev/net/tun to make bridges and TAP devices")


@pytest.fixture
def make_bridge() -> Iterator[Callable[..., str]]:
    """Bridges named for this test alone, removed afterwards with whatever is on them."""
    needs_root()
    made: list[str] = []

    def make(mtu: int = 0) -> str:
        name = f"vtb{secrets.token_hex(5)}"
        links.ensure_bridge(name, mtu)
        made.append(name)
        return name

    yield make
    for name in made:
        links.remove_link(name)


def own_taps(host_id: str) -> set[str]:
    return {tap for tap, alias in links.taps_with_prefix(TAP_PREFIX).items()
            if parse_alias(alias).get("owner") == host_id}


@pytest.fixture
def net_cluster(qemu_binary: str) -> Iterator[tuple[Cluster, str]]:
    """etcd, the controller and one QEMU agent whose host id is unique to this test."""
    needs_root()
    host_id = f"net-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix="vmm-net-"))
    cluster = Cluster(workdir, operation_timeout=30)
    try:
        cluster.start()
        cluster.add_agent(host_id, vcpus=4, memory=4 * GIB, backends="qemu")
        yield cluster, host_id
    finally:
        cluster.close()
        for tap in own_taps(host_id):
            links.remove_link(tap)
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


# ---- tests ------------------------------------------------------------------------------


def test_two_nics_get_taps_on_their_bridges_while_the_vm_runs_and_none_after_delete(
        net_cluster: tuple[Cluster, str], tiny: TinyGuest, kvm: None,
        make_bridge: Callable[..., str]) -> None:
    cluster, host_id = net_cluster
    mgmt, data = make_bridge(), make_bridge(mtu=9000)
    config = tiny_config(
        tiny,
        vm_pb2.NetworkInterface(id="eth0", tap_device=mgmt),
        vm_pb2.NetworkInterface(id="eth1", tap_device=data, mtu=1400,
                                mac_address="02:aa:bb:cc:dd:01"))
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
        net_cluster: tuple[Cluster, str], tiny: TinyGuest, kvm: None,
        make_bridge: Callable[..., str]) -> None:
    cluster, _ = net_cluster
    bridge = make_bridge()
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


def test_crashed_agent_and_hypervisor_leave_no_tap_and_orphans_go_at_start(
        net_cluster: tuple[Cluster, str], tiny: TinyGuest, kvm: None,
        make_bridge: Callable[..., str]) -> None:
    cluster, host_id = net_cluster
    bridge = make_bridge()
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
