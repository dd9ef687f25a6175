"""Names and addresses derived from a VM and its NICs, so a restarted agent finds each one."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from vmm.v1 import vm_pb2

# Every TAP the agent makes starts with this; the kernel allows 15 characters in all.
TAP_PREFIX = "vmm"
IFNAMSIZ = 15


def nic_ids(network: Sequence[vm_pb2.NetworkInterface]) -> list[str]:
    """Each NIC's id, or eth<i> for a NIC that names none (what the runtimes use too)."""
    return [n.id or f"eth{i}" for i, n in enumerate(network)]


def tap_name(owner: str, vm_id: str, nic_id: str) -> str:
    """The managed TAP of one NIC: the prefix and a hash of the agent, VM and NIC.

    The agent's own id is part of it so that two agents sharing a kernel (a test cluster)
    never pick the same name."""
    digest = hashlib.sha256(f"{owner}\0{vm_id}\0{nic_id}".encode()).hexdigest()
    return TAP_PREFIX + digest[:IFNAMSIZ - len(TAP_PREFIX)]


def guest_mac(vm_id: str, nic_id: str) -> str:
    """A stable, locally administered, unicast MAC for the guest side of a NIC."""
    octets = bytearray(hashlib.sha256(f"{vm_id}\0{nic_id}".encode()).digest()[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def tap_alias(owner: str, vm_id: str, nic_id: str) -> str:
    """The TAP's ifalias: who made it and for what, read back by the start-up sweep."""
    return f"vmm owner={owner} vm={vm_id} nic={nic_id}"


def parse_alias(alias: str) -> dict[str, str]:
    if not alias.startswith("vmm "):
        return {}
    return dict(part.split("=", 1) for part in alias.split()[1:] if "=" in part)
