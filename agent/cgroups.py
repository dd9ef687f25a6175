"""A cgroup per hypervisor, with the VM's CPU, memory and pids limits.

cgroup v2 where the unified hierarchy offers the cpu, memory and pids controllers; else
cgroup v1, one hierarchy per controller (hosts that mount v1 controllers beside an empty or
partial unified mount). Each agent keeps its VMs' groups under one group of its own,
`<parent>/<agent>`, so it can remove what belongs to none of its VMs without touching
another agent's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

CONTROLLERS = ("cpu", "memory", "pids")
# cpu.cfs_period_us / the period of cpu.max: 100 ms, the kernel's default.
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    vcpus: int
    memory_bytes: int
    pids: int


@dataclass(frozen=True)
class Hierarchy:
    """Where the controllers live: one v2 directory, or a v1 directory per controller."""

    version: int
    mounts: dict[str, Path]

    @classmethod
    def detect(cls) -> Hierarchy | None:
        v1: dict[str, Path] = {}
        for part in psutil.disk_partitions(all=True):
            if part.fstype == "cgroup2":
                mount = Path(part.mountpoint)
                try:
                    offered = set((mount / "cgroup.controllers").read_text().split())
                except OSError:
                    continue
                if set(CONTROLLERS) <= offered:
                    return cls(2, dict.fromkeys(CONTROLLERS, mount))
            elif part.fstype == "cgroup":
                for option in part.opts.split(","):
                    if option in CONTROLLERS:
                        v1[option] = Path(part.mountpoint)
        if set(CONTROLLERS) <= v1.keys():
            return cls(1, v1)
        return None

    def dirs(self, group: str) -> list[Path]:
        """The directories of one group: one for v2, one per controller for v1."""
        return sorted({mount / group for mount in self.mounts.values()})

    def procs_files(self, group: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(group)]

    def limit_files(self, group: str, limits: Limits) -> dict[Path, str]:
        quota = limits.vcpus * CPU_PERIOD_US
        if self.version == 2:
            d = self.mounts["cpu"] / group
            return {d / "cpu.max": f"{quota} {CPU_PERIOD_US}",
                    d / "memory.max": str(limits.memory_bytes),
                    d / "memory.swap.max": "0",
                    d / "pids.max": str(limits.pids)}
        cpu, memory, pids = (self.mounts[c] / group for c in CONTROLLERS)
        return {cpu / "cpu.cfs_period_us": str(CPU_PERIOD_US),
                cpu / "cpu.cfs_quota_us": str(quota),
                memory / "memory.limit_in_bytes": str(limits.memory_bytes),
                pids / "pids.max": str(limits.pids)}


def agent_group(state_dir: Path) -> str:
    """The name of an agent's own group: from its state dir, unique per agent on a host."""
    return "agent-" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


class VmCgroups:
    """The groups of one agent's hypervisors: `<parent>/<agent>/<vm name>`."""

    def __init__(self, hierarchy: Hierarchy, parent: str, agent: str) -> None:
        self.hierarchy = hierarchy
        self.base = f"{parent.strip('/')}/{agent}"

    def group(self, name: str) -> str:
        return f"{self.base}/{name}"

    def create(self, name: str, limits: Limits) -> list[Path]:
        """Create (or reset) the VM's group with its limits; the cgroup.procs files a
        process writes itself into."""
        if self.hierarchy.version == 2:
            self._enable_controllers_down_to(self.group(name))
        for d in self.hierarchy.dirs(self.group(name)):
            d.mkdir(parents=True, exist_ok=True)
        for path, value in self.hierarchy.limit_files(self.group(name), limits).items():
            _write_limit(path, value)
        return self.hierarchy.procs_files(self.group(name))

    def _enable_controllers_down_to(self, group: str) -> None:
        # v2: a group's controllers must be enabled in every ancestor's subtree_control.
        mount = self.hierarchy.mounts["cpu"]
        current = mount
        for part in Path(group).parts[:-1]:
            current = current / part
            current.mkdir(exist_ok=True)
        current = mount
        for part in Path(group).parts[:-1]:
            control = current / "cgroup.subtree_control"
            enabled = set(control.read_text().split())
            for controller in CONTROLLERS:
                if controller not in enabled:
                    control.write_text(f"+{controller}")
            current = current / part
        (current / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))

    def remove(self, name: str) -> bool:
        """Remove the VM's group, once its processes are gone; False while one remains (a
        killed process leaves its group a moment after it is reported dead)."""
        return all([_rmdir(d) for d in self.hierarchy.dirs(self.group(name))])

    def names(self) -> set[str]:
        """The VM groups that exist under this agent's group."""
        found: set[str] = set()
        for d in self.hierarchy.dirs(self.base):
            with contextlib.suppress(OSError):
                found |= {p.name for p in d.iterdir() if p.is_dir()}
        return found

    def remove_own_group_if_empty(self) -> None:
        """At agent exit: the agent's group goes when none of its VMs has one left."""
        for d in self.hierarchy.dirs(self.base):
            with contextlib.suppress(OSError):  # in use, or already gone
                d.rmdir()

    def remove_all_but(self, keep: set[str]) -> list[str]:
        """Remove the groups of VMs not in keep (left by a crash); the names removed."""
        return [name for name in sorted(self.names() - keep) if self.remove(name)]


def _write_limit(path: Path, value: str) -> None:
    """One write to a cgroup file, skipped where the file is missing (memory.swap.max only
    exists with swap accounting). A bare write: a text file object costs more than it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True


def self_join_files(procs_files: list[Path]) -> list[Path] | None:
    """The cgroup v1 `tasks` files beside these cgroup.procs files, or None where a group has
    none (cgroup v2). A single-threaded process writing "0" there moves itself, and a thread
    moving itself spares the kernel the threadgroup lock, whose first taking after a quiet
    spell waits for an RCU grace period; v2's cgroup.threads serves threaded subtrees only."""
    tasks = [path.with_name("tasks") for path in procs_files]
    return tasks if tasks and all(path.exists() for path in tasks) else None


def move(pid: int, procs_files: list[Path]) -> None:
    """Move a process, all its threads, into a group (its cgroup.procs files)."""
    for path in procs_files:
        path.write_text(str(pid))
