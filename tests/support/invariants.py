"""What must hold of a fleet after any crash, once it has converged.

- every VM record is on a host that is connected and has the VM, and has reached its
  desired state (the generation carried out, no error), or is gone;
- no record is left marked for deletion;
- every VM a client was told exists does; every VM a client was told is deleted does not;
- no VM runs twice, and no hypervisor process, API socket or VM dir exists without a record
  of it on that host;
- each host's allocation is the sum of its VMs' reservations.

`converged` polls until all of it holds and fails with what did not.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.process import WAITER
from controller.etcd import EtcdClient
from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

PREFIX = "/vmm/"


@dataclass(frozen=True)
class Fleet:
    records: dict[str, records_pb2.VmRecord]
    allocations: dict[str, records_pb2.Allocation]
    alive: set[str]


async def read_fleet(endpoints: list[str]) -> Fleet:
    async with EtcdClient(endpoints, timeout=5.0) as etcd:
        vms, _ = await etcd.get_prefix(PREFIX + "vms/")
        allocs, _ = await etcd.get_prefix(PREFIX + "allocations/")
        alive, _ = await etcd.get_prefix(PREFIX + "alive/")
    return Fleet(
        records={kv.key.removeprefix(PREFIX + "vms/"): records_pb2.VmRecord.FromString(kv.value)
                 for kv in vms},
        allocations={kv.key.removeprefix(PREFIX + "allocations/"):
                     records_pb2.Allocation.FromString(kv.value) for kv in allocs},
        alive={kv.key.removeprefix(PREFIX + "alive/") for kv in alive})


def _socket_name(vm_id: str) -> str:
    # As agent.vm_dir names API sockets.
    return hashlib.sha256(vm_id.encode()).hexdigest()[:16] + ".sock"


def hypervisors(state_dir: Path) -> dict[str, list[int]]:
    """Socket file name -> pids of the live processes serving it, for one agent (not the
    waiter each runs under, whose command line names the same socket)."""
    sockets = str(state_dir / "sockets")
    found: dict[str, list[int]] = {}
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = p.info.get("cmdline") or []
        if p.info.get("status") == psutil.STATUS_ZOMBIE or WAITER in cmdline:
            continue
        for arg in cmdline:
            if sockets in arg:
                name = arg[arg.index(sockets) + len(sockets) + 1:].split(",")[0]
                found.setdefault(Path(name).name, []).append(p.pid)
                break
    return found


def violations(fleet: Fleet, agents: Mapping[str, Path], present: Collection[str] = (),
               absent: Collection[str] = ()) -> list[str]:
    out: list[str] = []
    S = vm_pb2.VmState
    for vm_id in present:
        if vm_id not in fleet.records:
            out.append(f"vm {vm_id} was acknowledged but has no record")
    for vm_id in absent:
        if vm_id in fleet.records:
            out.append(f"vm {vm_id} was acknowledged as deleted but has a record")
    held: dict[str, tuple[int, int, int]] = {}
    for vm_id, r in fleet.records.items():
        vcpus, memory, count = held.get(r.host_id, (0, 0, 0))
        held[r.host_id] = (vcpus + r.reserved.vcpus, memory + r.reserved.memory_bytes,
                           count + 1)
        if r.deleting:
            out.append(f"vm {vm_id} is still marked for deletion")
            continue
        if r.host_id not in fleet.alive:
            out.append(f"vm {vm_id}: its host {r.host_id} is not connected")
        st = r.status
        if st.observed_generation != r.generation or st.state != r.desired_state or st.error:
            out.append(f"vm {vm_id}: desired {S.Name(r.desired_state)} at generation "
                       f"{r.generation}, observed {S.Name(st.state)} at generation "
                       f"{st.observed_generation}{' error ' + st.error if st.error else ''}")
        state_dir = agents.get(r.host_id)
        if state_dir is not None and not (state_dir / "vms" / vm_id).is_dir():
            out.append(f"vm {vm_id}: host {r.host_id} has no state dir for it")
    for host_id in set(fleet.allocations) | set(held):
        alloc = fleet.allocations.get(host_id, records_pb2.Allocation())
        got = (alloc.allocated.vcpus, alloc.allocated.memory_bytes, alloc.vm_count)
        want = held.get(host_id, (0, 0, 0))
        if got != want:
            out.append(f"host {host_id}: allocation (vcpus, memory, vms) {got} != the sum of "
                       f"its VMs {want}")
    running: dict[str, str] = {}
    for host_id, state_dir in agents.items():
        mine = {vm_id for vm_id, r in fleet.records.items() if r.host_id == host_id}
        by_socket = {_socket_name(vm_id): vm_id for vm_id in mine}
        vms_root = state_dir / "vms"
        for d in vms_root.iterdir() if vms_root.is_dir() else ():
            if d.name not in mine:
                out.append(f"host {host_id}: state dir of vm {d.name}, which has no record here")
        sockets_root = state_dir / "sockets"
        for sock in sockets_root.iterdir() if sockets_root.is_dir() else ():
            vm_id = by_socket.get(sock.name)
            if vm_id is None:
                out.append(f"host {host_id}: API socket {sock.name} of no VM placed here")
        for sock_name, pids in hypervisors(state_dir).items():
            vm_id = by_socket.get(sock_name)
            if vm_id is None:
                out.append(f"host {host_id}: hypervisor pids {pids} of no VM placed here")
                continue
            if len(pids) > 1:
                out.append(f"vm {vm_id} runs {len(pids)} hypervisors on {host_id}: {pids}")
            if vm_id in running:
                out.append(f"vm {vm_id} runs on {running[vm_id]} and on {host_id}")
            running[vm_id] = host_id
        for vm_id in mine:
            r = fleet.records[vm_id]
            wants_process = r.desired_state in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED,
                                                S.VM_STATE_CREATED) and not r.deleting
            if wants_process and running.get(vm_id) != host_id:
                out.append(f"vm {vm_id} is {S.Name(r.desired_state)} but no hypervisor "
                           f"serves it on {host_id}")
    return out


def converged(endpoints: list[str], agents: Mapping[str, Path], present: Collection[str] = (),
              absent: Collection[str] = (), timeout: float = 30.0) -> Fleet:
    """Wait until the invariants hold; fail naming every one that still does not."""
    deadline = time.monotonic() + timeout
    while True:
        fleet = asyncio.run(read_fleet(endpoints))
        found = violations(fleet, agents, present, absent)
        if not found:
            return fleet
        if time.monotonic() > deadline:
            raise AssertionError("the fleet did not converge:\n  " + "\n  ".join(found))
        time.sleep(0.2)
