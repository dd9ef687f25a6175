"""What the reconciler asks of the host network: a VM's TAPs made before its hypervisor
opens them, removed after, and the TAPs of this agent that no VM owns swept at start.

A NIC is *managed* when it names a bridge: `bridge` (filled in from a fleet network) or a
`tap_device` that is a bridge on this host. The agent then makes a TAP named after the
VM and NIC on that bridge and hands the hypervisor a config naming that TAP and the NIC's
MAC. Any other `tap_device` is an existing device the agent uses as it is and never removes.
Resolving a config is idempotent: a resolved config resolves to itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from agent.network import links
from agent.network.names import TAP_PREFIX, guest_mac, nic_ids, parse_alias, tap_alias, tap_name
from agent.runtimes.base import Runtime, RuntimeFailure, positive_int
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NicPlan:
    nic_id: str
    tap: str
    mac: str
    managed: bool
    bridge: str = ""


def shaped_rate(nic: vm_pb2.NetworkInterface, runtime: Runtime | None) -> int:
    """Bytes/s the agent limits the TAP to: the NIC's rate_limit_bandwidth, where the
    hypervisor does not enforce it itself."""
    if runtime is None or runtime.limits_nic_rate:
        return 0
    return positive_int(nic.options.get("rate_limit_bandwidth", "")) or 0


class HostNetwork:
    def __init__(self, owner: str,
                 tap_uid: Callable[[str], int | None] = lambda vm_id: None) -> None:
        # The agent's id, part of every TAP name and alias it makes.
        self.owner = owner
        # The uid a VM's TAPs belong to: its hypervisor's, which opens them unprivileged.
        self.tap_uid = tap_uid

    # ---- plans (pure, apart from asking whether tap_device is a bridge) --------------

    def _plan(self, vm_id: str, nic: vm_pb2.NetworkInterface, nic_id: str) -> NicPlan:
        mac = nic.mac_address or guest_mac(vm_id, nic_id)
        bridge = nic.bridge
        if not bridge and links.is_bridge(nic.tap_device):
            bridge = nic.tap_device
        if bridge:
            return NicPlan(nic_id, tap_name(self.owner, vm_id, nic_id), mac, True, bridge)
        return NicPlan(nic_id, nic.tap_device, mac, False)

    def plan(self, vm_id: str, config: vm_pb2.VmConfig) -> list[NicPlan]:
        return [self._plan(vm_id, nic, nic_id)
                for nic, nic_id in zip(config.network, nic_ids(config.network), strict=True)]

    def preflight(self, vm_id: str, config: vm_pb2.VmConfig
                  ) -> tuple[vm_pb2.VmConfig, list[agent_pb2.FieldViolation]]:
        """The config as the hypervisor would get it (without making anything), and the
        NICs whose bridge this host lacks."""
        resolved = vm_pb2.VmConfig()
        resolved.CopyFrom(config)
        violations = []
        for i, plan in enumerate(self.plan(vm_id, config)):
            resolved.network[i].CopyFrom(self._resolved(config.network[i], plan))
            if plan.managed and not links.is_bridge(plan.bridge):
                violations.append(agent_pb2.FieldViolation(
                    field=f"config.network[{i}]",
                    description=f"bridge {plan.bridge} does not exist on this host"))
        return resolved, violations

    # ---- making and removing ------------------------------------------------------

    def _make(self, vm_id: str, nic: vm_pb2.NetworkInterface, plan: NicPlan,
              runtime: Runtime | None) -> None:
        queue_pairs = runtime.nic_queue_pairs(nic) if runtime is not None else 1
        spec = links.TapSpec(name=plan.tap, bridge=plan.bridge, mtu=nic.mtu,
                             owner_uid=self.tap_uid(vm_id) or 0,
                             multi_queue=queue_pairs > 1,
                             alias=tap_alias(self.owner, vm_id, plan.nic_id), vlan=nic.vlan,
                             rate_bytes=shaped_rate(nic, runtime))
        try:
            if links.ensure_tap(spec):
                log.info("made tap %s on %s for vm %s nic %s", plan.tap, plan.bridge, vm_id,
                         plan.nic_id, extra={"vm_id": vm_id})
        except (links.LinkError, NetlinkError, OSError) as e:
            # A missing bridge, a kernel without what the NIC asks (VLAN filtering, tc), a
            # name taken by another kind of device.
            raise RuntimeFailure(f"network interface {plan.nic_id}: {e}",
                                 "FAILED_PRECONDITION") from e

    @staticmethod
    def _resolved(nic: vm_pb2.NetworkInterface, plan: NicPlan) -> vm_pb2.NetworkInterface:
        out = vm_pb2.NetworkInterface()
        out.CopyFrom(nic)
        out.id = plan.nic_id
        out.mac_address = plan.mac
        if plan.managed:
            out.tap_device = plan.tap
            out.bridge = plan.bridge
        return out

    def _resolve_sync(self, vm_id: str, config: vm_pb2.VmConfig, make: bool,
                      runtime: Runtime | None = None) -> vm_pb2.VmConfig:
        resolved = vm_pb2.VmConfig()
        resolved.CopyFrom(config)
        made: list[str] = []
        try:
            for i, plan in enumerate(self.plan(vm_id, config)):
                if plan.managed and make:
                    self._make(vm_id, config.network[i], plan, runtime)
                    made.append(plan.tap)
                resolved.network[i].CopyFrom(self._resolved(config.network[i], plan))
        except Exception:
            for tap in made:  # a half-made VM leaves nothing behind
                links.remove_link(tap)
            raise
        return resolved

    async def attach(self, vm_id: str, config: vm_pb2.VmConfig,
                     runtime: Runtime | None = None) -> vm_pb2.VmConfig:
        """Make the VM's managed TAPs as the runtime will open them (queues, rate); the
        config the hypervisor is to run, naming them."""
        return await asyncio.to_thread(self._resolve_sync, vm_id, config, True, runtime)

    async def resolve(self, vm_id: str, config: vm_pb2.VmConfig) -> vm_pb2.VmConfig:
        """The config attach would give, changing nothing (for adopted VMs)."""
        return await asyncio.to_thread(self._resolve_sync, vm_id, config, False)

    async def attach_nic(self, vm_id: str, nic: vm_pb2.NetworkInterface, index: int,
                         runtime: Runtime | None = None) -> vm_pb2.NetworkInterface:
        """Make one hotplugged NIC's TAP (index: its place among the VM's NICs)."""
        def run() -> vm_pb2.NetworkInterface:
            plan = self._plan(vm_id, nic, nic.id or f"eth{index}")
            if plan.managed:
                self._make(vm_id, nic, plan, runtime)
            return self._resolved(nic, plan)
        return await asyncio.to_thread(run)

    def _release_sync(self, vm_id: str, ids: list[str]) -> None:
        # By name, not by plan: the bridge may be gone, the TAP must go all the same.
        for nic_id in ids:
            tap = tap_name(self.owner, vm_id, nic_id)
            if links.remove_link(tap):
                log.info("removed tap %s of vm %s nic %s", tap, vm_id, nic_id,
                         extra={"vm_id": vm_id})

    async def release(self, vm_id: str, config: vm_pb2.VmConfig) -> None:
        """Remove the VM's managed TAPs (an unmanaged tap_device never has such a name)."""
        await asyncio.to_thread(self._release_sync, vm_id, nic_ids(config.network))

    async def release_nic(self, vm_id: str, nic_id: str) -> None:
        await asyncio.to_thread(self._release_sync, vm_id, [nic_id])

    @staticmethod
    def status(resolved: vm_pb2.VmConfig) -> list[vm_pb2.NetworkInterfaceStatus]:
        """Each NIC of a resolved config as this host runs it."""
        return [vm_pb2.NetworkInterfaceStatus(
                    id=nic_id, network=nic.network, bridge=nic.bridge, tap_device=nic.tap_device,
                    mac_address=nic.mac_address, ip_address=nic.ip_address,
                    managed=bool(nic.bridge))
                for nic, nic_id in zip(resolved.network, nic_ids(resolved.network), strict=True)]

    # ---- start-up sweep -------------------------------------------------------------

    def _sweep_sync(self, wanted: set[str]) -> list[str]:
        removed = []
        for tap, alias in links.taps_with_prefix(TAP_PREFIX).items():
            fields = parse_alias(alias)
            if fields.get("owner") != self.owner or tap in wanted:
                continue
            if links.remove_link(tap):
                removed.append(tap)
                log.warning("removed tap %s: vm %s nic %s is not on this host", tap,
                            fields.get("vm", "?"), fields.get("nic", "?"),
                            extra={"vm_id": fields.get("vm", "")})
        return removed

    async def sweep(self, keep: dict[str, vm_pb2.VmConfig]) -> list[str]:
        """Remove this agent's TAPs that belong to none of `keep` (vm id -> config)."""
        wanted = {tap_name(self.owner, vm_id, nic_id)
                  for vm_id, config in keep.items() for nic_id in nic_ids(config.network)}
        try:
            return await asyncio.to_thread(self._sweep_sync, wanted)
        except (NetlinkError, OSError) as e:  # without CAP_NET_ADMIN, say so and go on
            log.error("cannot sweep orphaned taps: %s", e)
            return []

    # ---- what the host offers ---------------------------------------------------------

    async def bridges(self) -> list[str]:
        return await asyncio.to_thread(links.bridges)

    async def ensure_bridges(self, names: list[str]) -> None:
        """Make the configured bridges that are missing (they outlive the agent)."""
        for name in names:
            try:
                if await asyncio.to_thread(links.ensure_bridge, name):
                    log.info("made bridge %s", name)
            except (links.LinkError, NetlinkError, OSError) as e:
                log.error("cannot make bridge %s: %s", name, e)
