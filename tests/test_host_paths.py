"""The agent's host path policy: a VM config names only files under the agent's roots (or
allowed block devices), and a refused path answers exactly like a missing one."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agent.host_paths import HostPathPolicy, PathRefused, Use
from tests.support.api import etcd_revision
from tools.fleet.cluster import Cluster, wait_until
from vmm.v1 import vm_pb2


def violations(err: grpc.RpcError) -> dict[str, str]:
    """field -> description of the error's google.rpc.BadRequest."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    found: dict[str, str] = {}
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def a_block_device() -> str | None:
    for entry in sorted(Path("/dev").iterdir()):
        try:
            if stat.S_ISBLK(entry.stat().st_mode):
                return str(entry)
        except OSError:
            continue
    return None


def set_kernel(path: str) -> Callable[[vm_pb2.VmConfig], None]:
    return lambda c: setattr(c.boot, "kernel_path", path)


def set_initrd(path: str) -> Callable[[vm_pb2.VmConfig], None]:
    return lambda c: setattr(c.boot, "initrd_path", path)


def set_disk(path: str) -> Callable[[vm_pb2.VmConfig], None]:
    return lambda c: setattr(c.storage[0], "path", path)


def test_forbidden_and_missing_paths_get_one_answer_before_any_process_starts(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    root = tmp_path / "files"
    agent = cluster.add_agent("h1", backends="firecracker", host_path_roots=[root])
    base = example("lambda-function")  # its files live under root
    (root / "escape").symlink_to("/etc/passwd")
    (root / "a-directory").mkdir()
    device = a_block_device()
    cases: list[tuple[str, Callable[[vm_pb2.VmConfig], None], str]] = [
        ("missing", set_kernel(str(root / "no-such-kernel")), "config.boot.kernel_path"),
        ("/etc/shadow", set_kernel("/etc/shadow"), "config.boot.kernel_path"),
        ("/proc/self/environ", set_disk("/proc/self/environ"), "config.storage[0].path"),
        ("traversal", set_initrd(f"{root}/guests/../../../../../../etc/shadow"),
         "config.boot.initrd_path"),
        ("symlink out of the root", set_disk(str(root / "escape")), "config.storage[0].path"),
        ("directory", set_disk(str(root / "a-directory")), "config.storage[0].path"),
        ("console output outside the roots",
         lambda c: (setattr(c.console, "enabled", True),
                    setattr(c.console, "output", "/etc/cron.d/vm")),
         "config.console.output"),
    ]
    if device is not None:
        cases.append(("block device not on the allowlist", set_disk(device),
                      "config.storage[0].path"))
    answers: dict[str, str] = {}
    for name, change, field in cases:
        config = vm_pb2.VmConfig()
        config.CopyFrom(base)
        change(config)
        before = etcd_revision(cluster)
        with pytest.raises(grpc.RpcError) as err:
            cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="p", config=config))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        found = violations(err.value)
        assert list(found) == [field], (name, found)
        answers[name] = found[field]
        assert field in err.value.details()
        assert etcd_revision(cluster) == before, name
        assert not psutil.Process(agent.pid).children(recursive=True), name
        assert not (tmp_path / "agent-h1" / "vms" / "p").exists(), name
    # No caller can tell a forbidden file from a missing one.
    assert len(set(answers.values())) == 1, answers
    assert device is not None, "no block device in /dev to try"


def test_paths_inside_the_roots_are_accepted_and_console_output_is_honoured(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    root = tmp_path / "files"
    cluster.add_agent("h1", backends="firecracker", host_path_roots=[root])
    config = example("lambda-function")
    # A link that stays inside the root is fine; so is `..` that stays inside.
    kernel = Path(config.boot.kernel_path)
    (root / "current-kernel").symlink_to(kernel)
    config.boot.kernel_path = str(root / "images" / ".." / "current-kernel")
    config.console.enabled = True
    output = root / "logs" / "console-of-ok.log"
    output.parent.mkdir()
    config.console.output = str(output)
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="ok", config=config))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="ok"))
    wait_until(lambda: output.exists() and output.stat().st_size > 0, timeout=30,
               what="console output in the configured file")
    log = (tmp_path / "agent-h1" / "vms" / "ok" / "console.log")
    assert log.read_bytes().startswith(output.read_bytes()[:64])
    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="ok", force=True))
    wait_until(lambda: not (tmp_path / "agent-h1" / "vms" / "ok").exists(), timeout=30,
               what="the VM dir to go")
    assert output.exists(), "the console output file belongs to the host, not the VM dir"


def test_policy_resolves_links_and_allows_listed_devices_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "disk.img").write_bytes(b"x")
    (root / "link").symlink_to(root / "d" / "disk.img")
    device = a_block_device()
    assert device is not None, "no block device in /dev to try"
    policy = HostPathPolicy.of([str(root)], [device])
    # The hypervisor is handed the resolved path, not the caller's string.
    assert policy.resolve(str(root / "link"), Use.READ) == str(root / "d" / "disk.img")
    assert policy.resolve(device, Use.READ) == os.path.realpath(device)
    assert policy.resolve(str(root / "d" / "new.log"), Use.WRITE) == str(root / "d" / "new.log")
    for path, use in ((device, Use.WRITE), (str(root / "d"), Use.READ),
                      ("relative/disk.img", Use.READ), (str(root / "x" / "new.log"), Use.WRITE),
                      (str(root / "d" / "disk.img"), Use.SOCKET)):
        with pytest.raises(PathRefused):
            policy.resolve(path, use)
    with pytest.raises(PathRefused):
        HostPathPolicy.of([str(root)]).resolve(device, Use.READ)


def test_a_file_gone_after_its_config_passed_preflight_is_refused_at_create_and_undone(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig], tmp_path: Path) -> None:
    """The controller reuses a pass for the same config a moment later; the agent's own check
    at create, before anything starts, still refuses a file removed meanwhile."""
    root = tmp_path / "files"
    cluster.add_agent("h1", backends="firecracker", host_path_roots=[root])
    config = example("lambda-function")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="first", config=config))
    Path(config.boot.kernel_path).unlink()
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="second", config=config))
    # Refused by preflight if the pass has lapsed, else by the create: named either way.
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "config.boot.kernel_path" in err.value.details()
    with pytest.raises(grpc.RpcError) as gone:
        cluster.vms.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="second"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    listed = cluster.vms.ListVms(vm_pb2.ListVmsRequest())
    assert [vm.vm_id for vm in listed.vms] == ["first"]
    wait_until(lambda: not (tmp_path / "agent-h1" / "vms" / "second").exists(), timeout=30,
               what="the agent to remove what the refused create left")
