"""Firecracker under its own `jailer`: a chroot per VM, its uid and gid, its cgroup.

The jailer (run as root, moved into the VM's cgroup by the agent as it starts) makes
`<chroot_base>/firecracker/<id>/root`, chroots there, joins the host's network namespace
for VMs if one is configured, drops to the VM's uid and execs Firecracker (the same pid).
Firecracker then sees only what the agent links into that root: the kernel, initrd and
disks the host path policy allowed (hard links; a read-only kernel or initrd on another
filesystem is copied), its log and metrics files. Its API socket is `/run/firecracker.socket`
inside the chroot; the VM's socket path in the agent's state dir is a link to it, so the
runtime, and an agent restarted later, reach it the same way as an unjailed one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.hypervisors.errors import RuntimeFailure
from agent.jail import Confinement
from agent.vm_dir import VmDir
from vmm.v1 import vm_pb2

API_SOCKET = "/run/firecracker.socket"
LOG_FILE = "/hypervisor.log"
METRICS_FILE = "/metrics.json"


@dataclass(frozen=True)
class FirecrackerJailer:
    binary: str
    chroot_base: Path
    # A network namespace for every VM to join (the host's TAPs live there), or "".
    netns: str = ""

    def root(self, jail_id: str, exec_file: str) -> Path:
        return self.chroot_base / Path(exec_file).name / jail_id / "root"

    def argv(self, jail_id: str, exec_file: str, confinement: Confinement,
             firecracker_args: list[str]) -> list[str]:
        if confinement.uid is None or confinement.gid is None:
            raise RuntimeFailure("the jailer needs hypervisor uids (hypervisor_uids)",
                                 "FAILED_PRECONDITION")
        argv = [self.binary, "--id", jail_id, "--exec-file", exec_file,
                "--uid", str(confinement.uid), "--gid", str(confinement.gid),
                "--chroot-base-dir", str(self.chroot_base)]
        if self.netns:
            argv += ["--netns", self.netns]
        return [*argv, "--", "--api-sock", API_SOCKET, *firecracker_args]

    def link_socket(self, vm: VmDir, root: Path) -> None:
        """The VM's API socket path, pointing into the chroot."""
        vm.api_socket.unlink(missing_ok=True)
        vm.api_socket.symlink_to(root / API_SOCKET.lstrip("/"))

    def place(self, vm: VmDir, root: Path, config: vm_pb2.VmConfig,
              confinement: Confinement) -> vm_pb2.VmConfig:
        """Make the chroot (the jailer takes it as it finds it) and link the VM's files
        in: the config as Firecracker sees it there. The VM dir's log and metrics files
        become links to the chroot's."""
        root.mkdir(parents=True, exist_ok=True)
        inside = vm_pb2.VmConfig()
        inside.CopyFrom(config)
        inside.boot.kernel_path = _link(root, config.boot.kernel_path, "kernel", copy_ok=True)
        if config.boot.initrd_path:
            inside.boot.initrd_path = _link(root, config.boot.initrd_path, "initrd",
                                            copy_ok=True)
        for i, disk in enumerate(config.storage):
            inside.storage[i].path = _link(root, disk.path, f"drive-{i}",
                                           copy_ok=disk.read_only)
        for host_side, name in ((vm.hypervisor_log, LOG_FILE), (vm.metrics_file, METRICS_FILE)):
            target = root / name.lstrip("/")
            target.touch()
            if confinement.uid is not None:
                os.chown(target, confinement.uid, confinement.gid or 0)
            host_side.unlink(missing_ok=True)
            host_side.symlink_to(target)
        return inside

    def keep_previous_log(self, vm: VmDir) -> None:
        """The log of the VM's previous process, out of its chroot before that goes."""
        if vm.hypervisor_log.is_symlink() and vm.hypervisor_log.exists():
            shutil.copyfile(vm.hypervisor_log,
                            vm.hypervisor_log.with_name(vm.hypervisor_log.name + ".1"))

    def remove(self, jail_id: str, exec_file: str) -> None:
        """The VM's chroot, with the links in it (never the files they name)."""
        jail = self.root(jail_id, exec_file).parent
        shutil.rmtree(jail, ignore_errors=True)
        with contextlib.suppress(OSError):  # other VMs' jails are still there
            jail.parent.rmdir()


def _link(root: Path, host_path: str, name: str, copy_ok: bool) -> str:
    target = root / name
    target.unlink(missing_ok=True)
    try:
        os.link(host_path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV or not copy_ok:
            raise RuntimeFailure(f"cannot link {host_path} into the jail: {exc.strerror} "
                                 "(disks must be on the jail's filesystem)",
                                 "FAILED_PRECONDITION") from exc
        shutil.copyfile(host_path, target)
        os.chmod(target, 0o444)
    return f"/{name}"
