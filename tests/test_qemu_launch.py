"""VmConfig -> QEMU command line, config checks and the accelerator policy's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.runtimes.qemu.accel import Accel, AccelChoice, hardware_virtualization, is_linux_kernel
from agent.runtimes.qemu.config import Machine, choose_machine, config_violations, parse_cpu_list
from agent.runtimes.qemu.launch import SPARE_HOTPLUG_PORTS, build_launch, device_option, kernel_args
from agent.vm_dir import VmDir
from vmm.v1 import vm_pb2

MIB = 1024 * 1024
KVM = AccelChoice(Accel.KVM, "host", "test")


def base_config(**boot_options: str) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=2),
        memory=vm_pb2.MemoryConfig(size_bytes=256 * MIB),
        boot=vm_pb2.BootConfig(kernel_path="/k/vmlinux", boot_options=boot_options))


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_the_plain_config_runs_on_microvm_paused_with_qmp_and_a_console_file(
        tmp_path: Path) -> None:
    vm = VmDir(tmp_path / "vm")
    launch = build_launch("qemu", vm, base_config(), KVM)
    argv = launch.argv
    assert launch.machine == Machine.MICROVM
    assert option_values(argv, "-machine") == ["microvm,accel=kvm"]
    assert "-S" in argv and "-nodefaults" in argv
    assert option_values(argv, "-qmp") == [f"unix:{vm.api_socket},server=on,wait=off"]
    assert option_values(argv, "-chardev") == [
        f"file,id=serial0,path={vm.console_log},append=on",
        f"pipe,id=qmp-events,path={vm.path / 'qmp-events'}"]
    # Guest panics: a pvpanic device, a guest stopped in place, its event in a file.
    assert option_values(argv, "-device")[0] == "pvpanic"
    assert "panic=pause" in option_values(argv, "-action")[0]
    assert option_values(argv, "-mon") == ["chardev=qmp-events,mode=control"]
    assert option_values(argv, "-smp") == ["cpus=2,maxcpus=2"]
    assert option_values(argv, "-m") == ["size=256M"]
    assert option_values(argv, "-append") == ["console=ttyS0"]


@pytest.mark.parametrize(("change", "machine"), [
    (lambda c: setattr(c.cpu, "max_vcpu_count", 4), Machine.Q35),
    (lambda c: setattr(c.memory, "max_size_bytes", 512 * MIB), Machine.Q35),
    (lambda c: c.memory.backing.update({"numa_nodes": "2"}), Machine.Q35),
    (lambda c: c.boot.boot_options.update({"machine": "q35"}), Machine.Q35),
    (lambda c: setattr(c.cpu, "max_vcpu_count", 2), Machine.MICROVM),
])
def test_machine_choice(change: object, machine: Machine) -> None:
    config = base_config()
    assert callable(change)
    change(config)
    assert choose_machine(config, Accel.KVM) == machine


def test_tcg_runs_on_q35_unless_told_otherwise() -> None:
    assert choose_machine(base_config(), Accel.TCG) == Machine.Q35
    assert choose_machine(base_config(machine="microvm"), Accel.TCG) == Machine.MICROVM


def test_q35_reserves_hotplug_room(tmp_path: Path) -> None:
    config = base_config()
    config.cpu.max_vcpu_count = 8
    config.memory.max_size_bytes = 1024 * MIB
    config.storage.add(id="root", path="/d/root.img", is_root_device=True, read_only=True)
    launch = build_launch("qemu", VmDir(tmp_path / "vm"), config, KVM)
    assert option_values(launch.argv, "-smp") == ["cpus=2,maxcpus=8"]
    assert option_values(launch.argv, "-m") == ["size=256M,slots=8,maxmem=1024M"]
    ports = [d for d in option_values(launch.argv, "-device") if d.startswith("pcie-root-port")]
    assert len(ports) == 1 + SPARE_HOTPLUG_PORTS == launch.port_count
    assert launch.ports == {"disk-root": "port0"}
    assert "virtio-blk-pci,id=disk-root,drive=disk-root,write-cache=on,bus=port0" in \
        option_values(launch.argv, "-device")


def test_disk_options_become_block_node_properties(tmp_path: Path) -> None:
    config = base_config()
    config.storage.add(id="data", path="/d/data.img", read_only=True, options={
        "cache_type": "none", "io_engine": "io_uring", "rate_limit_ops": "500",
        "num_queues": "2"})
    argv = build_launch("qemu", VmDir(tmp_path / "vm"), config, KVM).argv
    group = json.loads(option_values(argv, "-object")[0])
    assert group == {"qom-type": "throttle-group", "id": "throttle-data", "x-iops-total": 500}
    node = json.loads(option_values(argv, "-blockdev")[0])
    assert (node["driver"], node["node-name"], node["read-only"]) == ("throttle", "disk-data",
                                                                      True)
    raw = node["file"]
    assert raw["driver"] == "raw" and raw["cache"] == {"direct": True, "no-flush": False}
    assert raw["file"] == {"driver": "file", "filename": "/d/data.img", "node-name": "file-data",
                           "read-only": True, "aio": "io_uring",
                           "cache": {"direct": True, "no-flush": False}}
    assert "virtio-blk-device,id=disk-data,drive=disk-data,write-cache=on,num-queues=2" in \
        option_values(argv, "-device")


def test_nics_tap_and_vhost_user(tmp_path: Path) -> None:
    config = base_config()
    config.network.add(id="eth0", tap_device="tap0", mac_address="52:54:00:AA:BB:CC")
    config.network.add(id="fast", interface_type="vhost-user",
                       options={"socket": "/run/vhost,1.sock"})
    argv = build_launch("qemu", VmDir(tmp_path / "vm"), config, KVM).argv
    assert option_values(argv, "-netdev") == [
        "tap,id=net-eth0,ifname=tap0,script=no,downscript=no", "vhost-user,id=net-fast,"
        "chardev=chr-fast"]
    assert "socket,id=chr-fast,path=/run/vhost,,1.sock" in option_values(argv, "-chardev")
    assert "virtio-net-device,id=nic-eth0,netdev=net-eth0,mac=52:54:00:aa:bb:cc" in \
        option_values(argv, "-device")
    # vhost-user needs guest memory the backend process can map.
    ram = json.loads(option_values(argv, "-object")[0])
    assert ram["qom-type"] == "memory-backend-memfd" and ram["share"] is True
    assert "microvm,accel=kvm,memory-backend=ram" in option_values(argv, "-machine")


def test_numa_splits_memory_and_sockets(tmp_path: Path) -> None:
    config = base_config()
    config.memory.backing["numa_nodes"] = "2"
    argv = build_launch("qemu", VmDir(tmp_path / "vm"), config, KVM).argv
    assert option_values(argv, "-smp") == ["cpus=2,maxcpus=2,sockets=2"]
    assert option_values(argv, "-numa") == [
        "node,nodeid=0,memdev=ram-node0", "node,nodeid=1,memdev=ram-node1",
        "cpu,node-id=0,socket-id=0", "cpu,node-id=1,socket-id=1"]
    sizes = [json.loads(o)["size"] for o in option_values(argv, "-object")]
    assert sizes == [128 * MIB, 128 * MIB]


def test_kernel_args_name_the_root_disk_unless_they_do_already() -> None:
    config = base_config()
    config.boot.kernel_args = "console=ttyS0 quiet"
    config.storage.add(id="data", path="/d/data.img")
    config.storage.add(id="root", path="/d/root.img", is_root_device=True, read_only=True)
    assert kernel_args(config) == "console=ttyS0 quiet root=/dev/vda ro"
    config.boot.kernel_args = "console=ttyS0 root=/dev/vdb1"
    assert kernel_args(config) == "console=ttyS0 root=/dev/vdb1"


def test_config_violations_name_the_field() -> None:
    config = base_config(machine="pc", accel="hvf")
    config.memory.size_bytes = 100 * MIB + 1
    config.memory.backing["hugepages"] = "4K"
    config.cpu.features["affinity"] = "3-1"
    config.storage.add(id="d", path="/d.img", options={"io_engine": "posix", "bogus": "1"})
    config.storage.add(id="d", path="/e.img")
    config.network.add(id="v", interface_type="vhost-user")
    config.network.add(id="p", interface_type="sriov", options={"pci_address": "3b:02.1"})
    fields = {v.field for v in config_violations(config)}
    assert fields == {
        "config.boot.boot_options[machine]", "config.boot.boot_options[accel]",
        "config.memory.size_bytes", "config.memory.backing[hugepages]",
        "config.cpu.features[affinity]", "config.storage[0].options[io_engine]",
        "config.storage[0].options[bogus]", "config.storage[1].id",
        "config.network[0].options[socket]", "config.network[1].options[pci_address]",
    }
    assert config_violations(base_config()) == []


def test_device_option_escapes_commas() -> None:
    assert device_option({"driver": "x", "path": "/a,b", "on": True, "n": 3}) == \
        "x,path=/a,,b,on=on,n=3"


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5}
    assert parse_cpu_list("7") == {7}
    assert parse_cpu_list("2-1") is None and parse_cpu_list("a") is None


def test_hardware_virtualization_reads_the_cpu_flags(tmp_path: Path) -> None:
    with_vmx = tmp_path / "vmx"
    with_vmx.write_text("processor\t: 0\nflags\t\t: fpu vme vmx sse\n")
    without = tmp_path / "none"
    without.write_text("processor\t: 0\nflags\t\t: fpu vme hypervisor sse\n")
    assert hardware_virtualization(with_vmx)
    assert not hardware_virtualization(without)


def test_is_linux_kernel_knows_bzimages_and_elf_kernels(tmp_path: Path) -> None:
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    other = tmp_path / "blob"
    other.write_bytes(b"\0" * 4096)
    assert is_linux_kernel(bzimage)
    assert not is_linux_kernel(other)
    assert not is_linux_kernel(tmp_path / "missing")
