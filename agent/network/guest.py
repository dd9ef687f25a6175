"""What the guest is told of its network: `ip=` arguments on the kernel command line.

The format is the kernel's own (Documentation/admin-guide/nfs/nfsroot.rst),
`ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>`, one per NIC
that has an address, naming eth<i> in NIC order. The project's guest initramfs reads them
(the kernel itself keeps only the last); Firecracker guests can read MMDS instead.
"""

from __future__ import annotations

import ipaddress
import re

from vmm.v1 import vm_pb2

_HAS_IP_ARG = re.compile(r"(^|\s)ip=")


def kernel_ip_args(config: vm_pb2.VmConfig) -> str:
    args = []
    for i, nic in enumerate(config.network):
        if nic.ip_address:
            iface = ipaddress.IPv4Interface(nic.ip_address)
            args.append(f"ip={iface.ip}::{nic.gateway}:{iface.netmask}::eth{i}:off")
    return " ".join(args)


def with_ip_args(config: vm_pb2.VmConfig) -> None:
    """Append the NICs' ip= arguments to the kernel command line, unless it has its own."""
    args = kernel_ip_args(config)
    if args and not _HAS_IP_ARG.search(config.boot.kernel_args):
        config.boot.kernel_args = f"{config.boot.kernel_args} {args}".strip()
