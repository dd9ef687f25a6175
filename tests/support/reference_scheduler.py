"""Brute-force placement: every (host, backend) pair evaluated on its own, exact arithmetic.

The indexed scheduler must make the same decisions; this is what it is checked against.
"""

from __future__ import annotations

from fractions import Fraction

from controller.fleet_index import backend_class
from controller.scheduler import Choice, HostView, NoPlacement, Room, bridges_for, demand_for
from controller.validation import check_backend
from vmm.v1 import vm_pb2


def reference_place(config: vm_pb2.VmConfig, hosts: list[HostView], backend: str = "",
                    host_id: str = "", preference: tuple[str, ...] = (),
                    reserve_max: bool = True) -> Choice | NoPlacement:
    why = NoPlacement()
    bridges = bridges_for(config)
    eligible = [h for h in hosts if h.ready and (not host_id or h.host_id == host_id)]
    if bridges and (eligible or not host_id) and not any(bridges <= h.bridges
                                                         for h in eligible):
        # (A named host that is not ready is refused for that reason alone.)
        return NoPlacement(demand=demand_for(config, False), missing_bridges=bridges)
    any_ok = False
    refusals: dict[str, tuple[bytes, list]] = {}
    full: list[HostView] = []
    candidates = []
    for host in hosts:
        if not host.ready or (host_id and host.host_id != host_id):
            continue
        for name, offered in host.backends.items():
            if backend and name != backend:
                continue
            why.offered_backends.add(name)
            cls = backend_class(offered)
            fit = check_backend(config, offered.capabilities)
            if not fit.ok:
                if name not in refusals or cls.key < refusals[name][0]:
                    refusals[name] = (cls.key, fit.violations)
                continue
            any_ok = True
            if not bridges <= host.bridges:
                continue  # cannot attach the VM's networks
            need = demand_for(config, reserve_max and cls.honours_max_vcpus)
            if need.vcpus > host.free_vcpus or need.memory > host.free_memory:
                full.append(host)
                continue
            score = (Fraction(host.allocated_vcpus + need.vcpus, max(host.allocatable_vcpus, 1))
                     + Fraction(host.allocated_memory + need.memory,
                                max(host.allocatable_memory, 1)))
            rank = preference.index(name) if name in preference else len(preference)
            candidates.append(((-score, offered.simulated, rank, host.host_id, name),
                               Choice(host, offered, fit, need)))
    if candidates:
        if not backend and any(not c[1].fit.warnings for c in candidates):
            candidates = [c for c in candidates if not c[1].fit.warnings]
        return min(candidates, key=lambda c: c[0])[1]
    if not any_ok:
        why.backend_violations = {name: v for name, (_, v) in refusals.items()}
    best = max(sorted(full, key=lambda h: h.host_id),
               key=lambda h: (h.free_memory, h.free_vcpus), default=None)
    if best is not None:
        why.roomiest = Room(best.host_id, best.free_vcpus, best.free_memory)
    asked = sorted((backend_class(b) for h in hosts
                    if h.ready and (not host_id or h.host_id == host_id)
                    for n, b in h.backends.items()
                    if n == backend and check_backend(config, b.capabilities).ok),
                   key=lambda c: c.key)
    why.demand = demand_for(config, reserve_max and asked[0].honours_max_vcpus if asked
                            else False)
    return why
