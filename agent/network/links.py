"""Netlink operations on host links (pyroute2), each one synchronous and idempotent.

pyroute2's synchronous IPRoute runs an event loop of its own, so the agent calls these
through `asyncio.to_thread`; tests and the local launcher call them directly.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# tun_flags bit of a multi-queue TAP (linux/if_tun.h IFF_MULTI_QUEUE).
IFF_MULTI_QUEUE = 0x0100


@dataclass(frozen=True)
class TapSpec:
    name: str
    bridge: str
    # 0 keeps the bridge's MTU.
    mtu: int = 0
    owner_uid: int = 0
    multi_queue: bool = False
    alias: str = ""
    # 0: untagged; else the bridge port's PVID (the bridge must filter VLANs).
    vlan: int = 0
    # Bytes/s the host sends the guest at most (a token bucket on the TAP's egress); 0: any.
    rate_bytes: int = 0


class LinkError(Exception):
    """A link the agent needs is missing or of the wrong kind."""


def _kind(link: Any) -> str:
    info = link.get("IFLA_LINKINFO")
    return str(info.get("IFLA_INFO_KIND") or "") if info is not None else ""


def _lookup(ip: IPRoute, name: str) -> Any | None:
    found = ip.link("get", ifname=name) if ip.link_lookup(ifname=name) else []
    return found[0] if found else None


def is_bridge(name: str) -> bool:
    """From sysfs, so the event loop may ask (pyroute2's IPRoute may not run there)."""
    return bool(name) and "/" not in name and Path("/sys/class/net", name, "bridge").is_dir()


def link_kind(name: str) -> str | None:
    """The link's kind ("bridge", "tun", "" for a plain device), or None when absent."""
    with IPRoute() as ip:
        link = _lookup(ip, name)
        return None if link is None else _kind(link)


def bridges() -> list[str]:
    with IPRoute() as ip:
        return sorted(link.get("IFLA_IFNAME") for link in ip.get_links() if _kind(link) == "bridge")


def ensure_bridge(name: str, mtu: int = 0) -> bool:
    """Make the bridge unless it exists, and bring it up; True when it was made."""
    with IPRoute() as ip:
        link = _lookup(ip, name)
        if link is not None and _kind(link) != "bridge":
            raise LinkError(f"{name} exists and is not a bridge")
        made = link is None
        if made:
            ip.link("add", ifname=name, kind="bridge")
        index = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=index, state="up", **({"mtu": mtu} if mtu else {}))
        return made


def tun_flags(name: str) -> int:
    with open(f"/sys/class/net/{name}/tun_flags") as f:
        return int(f.read().strip(), 16)


def ensure_tap(spec: TapSpec) -> bool:
    """Make the TAP as spec says, enslaved to its bridge and up; True when it was made.

    An existing TAP of that name is kept (a hypervisor may hold it open) unless its queue
    mode differs, which the hypervisor could not open anyway."""
    with IPRoute() as ip:
        bridge = _lookup(ip, spec.bridge)
        if bridge is None or _kind(bridge) != "bridge":
            raise LinkError(f"bridge {spec.bridge} does not exist on this host")
        link = _lookup(ip, spec.name)
        if link is not None and _kind(link) != "tun":
            raise LinkError(f"{spec.name} exists and is not a TAP")
        if link is not None and bool(tun_flags(spec.name) & IFF_MULTI_QUEUE) != spec.multi_queue:
            ip.link("del", index=link["index"])
            link = None
        made = link is None
        if made:
            ip.link("add", ifname=spec.name, kind="tuntap", mode="tap", uid=spec.owner_uid,
                    ifr={"no_pi": 1, "multi_queue": int(spec.multi_queue)})
        index = ip.link_lookup(ifname=spec.name)[0]
        try:
            _configure_tap(ip, index, spec, bridge)
        except BaseException:
            if made:  # half made is not made: the caller may try again from nothing
                ip.link("del", index=index)
            raise
        return made


def _configure_tap(ip: IPRoute, index: int, spec: TapSpec, bridge: Any) -> None:
    mtu = spec.mtu or bridge.get("IFLA_MTU")
    ip.link("set", index=index, master=bridge["index"], mtu=mtu)
    if spec.alias:
        ip.link("set", index=index, ifalias=spec.alias)
    if spec.vlan:
        ip.vlan_filter("add", index=index,
                       vlan_info={"vid": spec.vlan, "flags": ["pvid", "untagged"]})
    if spec.rate_bytes:
        # The bucket holds a tenth of a second's worth (at least a few full frames).
        ip.tc("replace", "tbf", index, 0x10000, rate=spec.rate_bytes,
              burst=max(spec.rate_bytes // 10, 4 * 65536), latency="50ms")
    ip.link("set", index=index, state="up")


def remove_link(name: str) -> bool:
    """Delete the link if it exists; True when it did."""
    with IPRoute() as ip:
        indexes = ip.link_lookup(ifname=name)
        if not indexes:
            return False
        try:
            ip.link("del", index=indexes[0])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False
        return True


def taps_with_prefix(prefix: str) -> dict[str, str]:
    """TAP name -> ifalias of every TAP whose name starts with prefix."""
    with IPRoute() as ip:
        return {link.get("IFLA_IFNAME"): str(link.get("IFLA_IFALIAS") or "")
                for link in ip.get_links()
                if _kind(link) == "tun" and str(link.get("IFLA_IFNAME")).startswith(prefix)}
