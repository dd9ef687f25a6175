"""Least privilege for hypervisors: a uid of its own, a cgroup with the VM's limits.

Each VM gets the lowest free uid of the configured range (recorded in its directory, so a
restarted agent keeps it) and the hypervisor group, and a cgroup whose CPU quota, memory
limit and pids limit follow its config. The agent, root, prepares what the hypervisor then
opens as that uid: its writable disks and console output are handed to the uid (the owner
before is restored when the VM is removed), the files it writes in the VM directory are
created for it, and the sockets directory is writable by the hypervisor group (sticky, so
no hypervisor removes another's socket; connecting needs write access to a socket, which
only its own uid has).

agent.process.spawn starts the hypervisor through setpriv as that uid and gid, with no
supplementary groups and no_new_privs, and moves it into its cgroup as soon as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path

from agent import cgroups
from agent.atomic_file import replace_text
from agent.cgroups import Limits, VmCgroups
from agent.vm_dir import StateDir, VmDir
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")
# A killed hypervisor leaves its cgroup a moment after it is seen dead: retry for 5 s.
CGROUP_REMOVE_ATTEMPTS = 100
CGROUP_REMOVE_INTERVAL = 0.05
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"  # util-linux


@dataclass(frozen=True)
class Confinement:
    """What one hypervisor process runs with. None/empty: the agent's own (unconfined)."""

    uid: int | None = None
    gid: int | None = None
    # Supplementary groups: the one that may open /dev/kvm.
    groups: tuple[int, ...] = ()
    cgroup_procs: tuple[str, ...] = ()
    # The limits the cgroup was given: vCPUs, memory bytes, pids.
    cgroup_limits: tuple[int, ...] = ()
    # Host files handed to the uid: path -> [uid, gid] before, restored on release.
    owners_before: dict[str, list[int]] = field(default_factory=dict)

    def drop_privileges(self) -> list[str]:
        """The argv prefix that runs a command as this uid and gid, without supplementary
        groups and unable to gain privileges (setpriv execs it: the pid stays the same).
        A separate program rather than Popen(user=...): that forks the agent, whose gRPC
        threads' fork handlers can crash the child."""
        if self.uid is None:
            return []
        groups = (f"--groups={','.join(map(str, self.groups))}" if self.groups
                  else "--clear-groups")
        return [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}", groups,
                "--no-new-privs", "--"]

    def enter_cgroup(self, pid: int) -> None:
        """Move a just-started hypervisor into its cgroup, before it is configured (so
        before it maps guest memory or starts vCPU threads)."""
        cgroups.move(pid, [Path(p) for p in self.cgroup_procs])

    @classmethod
    def load(cls, vm: VmDir) -> Confinement:
        try:
            data = json.loads(vm.jail_file.read_text())
            return cls(uid=data.get("uid"), gid=data.get("gid"),
                       groups=tuple(data.get("groups", ())),
                       cgroup_procs=tuple(data.get("cgroup_procs", ())),
                       cgroup_limits=tuple(data.get("cgroup_limits", ())),
                       owners_before={k: list(v) for k, v in
                                      data.get("owners_before", {}).items()})
        except (OSError, ValueError, AttributeError):
            return cls()

    def save(self, vm: VmDir) -> None:
        replace_text(vm.jail_file, json.dumps(asdict(self), sort_keys=True))


@dataclass(frozen=True)
class JailSettings:
    # uids handed out one per VM, inclusive; None runs hypervisors as the agent's user.
    uids: range | None = None
    gid: int = 0
    # Where VM cgroups go; None runs hypervisors in the agent's own cgroup.
    cgroups: VmCgroups | None = None
    # Memory beyond the guest's the hypervisor may use (its own code, device buffers).
    memory_overhead_bytes: int = 256 << 20
    pids_max: int = 512


def parse_uid_range(text: str) -> range | None:
    """"64000-64999" -> range(64000, 65000); "" -> None."""
    if not text.strip():
        return None
    first, _, last = text.partition("-")
    low, high = int(first), int(last or first)
    if low <= 0 or high < low:
        raise ValueError(f"hypervisor uid range {text!r} must be positive, low-high")
    return range(low, high + 1)


def limits_for(config: vm_pb2.VmConfig, settings: JailSettings) -> Limits:
    """The cgroup limits a VM's config implies: its (maximum) vCPUs, its (maximum) memory
    plus the overhead allowance, and the agent's pids limit."""
    vcpus = max(config.cpu.vcpu_count, config.cpu.max_vcpu_count, 1)
    memory = max(config.memory.size_bytes, config.memory.max_size_bytes)
    return Limits(vcpus=vcpus, memory_bytes=memory + settings.memory_overhead_bytes,
                  pids=settings.pids_max)


class HypervisorJail:
    def __init__(self, state: StateDir, settings: JailSettings) -> None:
        self.state = state
        self.settings = settings
        self._uids: dict[str, int] = {}  # vm id -> uid, of every VM dir
        self._kvm_groups: tuple[int, ...] = ()
        for vm in state.existing():
            uid = Confinement.load(vm).uid
            if uid is not None:
                self._uids[vm.vm_id] = uid
        if settings.uids is not None:
            self._open_shared_paths()

    def _open_shared_paths(self) -> None:
        sockets = self.state.sockets_dir
        sockets.mkdir(parents=True, exist_ok=True)
        os.chown(sockets, 0, self.settings.gid)
        os.chmod(sockets, 0o1770)
        self._kvm_groups = self._kvm_access()

    def _kvm_access(self) -> tuple[int, ...]:
        """The group through which hypervisors open /dev/kvm. Where udev has given it to
        no group (root-only), the agent gives it to the hypervisor group, as udev's rule
        for the kvm group would."""
        try:
            st = KVM_DEVICE.stat()
        except OSError:
            return ()
        if st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IWOTH:
            return ()
        if st.st_gid == 0:
            os.chown(KVM_DEVICE, -1, self.settings.gid)
            os.chmod(KVM_DEVICE, stat.S_IMODE(st.st_mode) | 0o060)
            log.info("%s is now group %d read-write, for the hypervisors", KVM_DEVICE,
                     self.settings.gid)
            return ()
        return () if st.st_gid == self.settings.gid else (st.st_gid,)

    def prepare(self, vm: VmDir, config: vm_pb2.VmConfig,
                writable_files: Iterable[Path]) -> Confinement:
        """Set up (or refresh) the VM's uid, cgroup and file access; the confinement its
        hypervisor process enters. writable_files: files in the VM dir the hypervisor
        writes by path (logs, metrics, the console where it opens that itself)."""
        vm.create()
        before = Confinement.load(vm)
        uid, gid = self._uid_for(vm.vm_id, before.uid), None
        procs: tuple[str, ...] = ()
        limits: tuple[int, ...] = ()
        owners = dict(before.owners_before)
        if self.settings.cgroups is not None:
            wanted = limits_for(config, self.settings)
            limits = astuple(wanted)
            if limits == before.cgroup_limits and before.cgroup_procs \
                    and all(os.path.exists(p) for p in before.cgroup_procs):
                procs = before.cgroup_procs  # a boot after the create made it so
            else:
                procs = tuple(str(p) for p in self.settings.cgroups.create(
                    cgroup_name(vm.vm_id), wanted))
        if uid is not None:
            gid = self.settings.gid
            for path in writable_files:
                if path.is_symlink():
                    continue  # into a Firecracker jail, made for the uid there
                path.touch()
                os.chown(path, uid, gid)
            _hand_over(_host_files_written(config), uid, gid, owners)
        confinement = Confinement(uid=uid, gid=gid,
                                  groups=self._kvm_groups if uid is not None else (),
                                  cgroup_procs=procs, cgroup_limits=limits,
                                  owners_before=owners)
        if confinement != before:
            confinement.save(vm)
        return confinement

    def hand_over(self, vm: VmDir, disk: vm_pb2.StorageDevice) -> None:
        """A disk plugged into a running VM: writable, it is handed to the VM's uid too."""
        confinement = Confinement.load(vm)
        if confinement.uid is None or disk.read_only or not os.path.exists(disk.path):
            return
        owners = dict(confinement.owners_before)
        _hand_over([disk.path], confinement.uid, confinement.gid or 0, owners)
        replace(confinement, owners_before=owners).save(vm)

    def _uid_for(self, vm_id: str, recorded: int | None) -> int | None:
        uids = self.settings.uids
        if uids is None:
            return None
        if recorded is not None and recorded in uids:
            self._uids[vm_id] = recorded
            return recorded
        taken = set(self._uids.values())
        for uid in uids:
            if uid not in taken:
                self._uids[vm_id] = uid
                return uid
        raise RuntimeError(f"every hypervisor uid of {uids.start}-{uids.stop - 1} is in use")

    def uid_of(self, vm_id: str) -> int | None:
        """The uid the VM's hypervisor runs as; None when hypervisors run as the agent."""
        return self._uids.get(vm_id)

    async def release(self, vm: VmDir) -> None:
        """After the hypervisor is gone for good: its cgroup goes, host files get their
        owners back, its uid is free again."""
        confinement = Confinement.load(vm)
        if self.settings.cgroups is not None:
            for _ in range(CGROUP_REMOVE_ATTEMPTS):
                if self.settings.cgroups.remove(cgroup_name(vm.vm_id)):
                    break
                await asyncio.sleep(CGROUP_REMOVE_INTERVAL)
            else:
                log.warning("the cgroup of vm %s still has processes; left in place",
                            vm.vm_id, extra={"vm_id": vm.vm_id})
        for path, (uid, gid) in confinement.owners_before.items():
            with contextlib.suppress(OSError):
                os.chown(path, uid, gid)
        self._uids.pop(vm.vm_id, None)

    def close(self) -> None:
        if self.settings.cgroups is not None:
            self.settings.cgroups.remove_own_group_if_empty()

    def remove_leftovers(self) -> list[str]:
        """At agent start: remove cgroups that belong to none of this agent's VMs."""
        if self.settings.cgroups is None:
            return []
        keep = {cgroup_name(vm.vm_id) for vm in self.state.existing()}
        return self.settings.cgroups.remove_all_but(keep)


def cgroup_name(vm_id: str) -> str:
    return vm_id


def _hand_over(paths: Iterable[str], uid: int, gid: int, owners: dict[str, list[int]]) -> None:
    """chown paths to uid:gid, recording each one's owner before (the first time)."""
    for path in paths:
        if path not in owners:
            st = os.stat(path)
            owners[path] = [st.st_uid, st.st_gid]
        os.chown(path, uid, gid)


def _host_files_written(config: vm_pb2.VmConfig) -> list[str]:
    """Host files (already allowed and resolved) the hypervisor writes: read-write disks
    (files or allowed block devices) and the console output."""
    paths = [d.path for d in config.storage
             if d.path and not d.read_only and os.path.exists(d.path)]
    if config.console.output:
        output = Path(config.console.output)
        output.touch()
        paths.append(str(output))
    return paths
