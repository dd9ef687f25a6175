"""Agent configuration: defaults for one machine, a TOML file ([agent] table), environment
variables (VMM_AGENT_<FIELD>) and flags, in increasing order of precedence."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from vmm.common.settings import load_settings


@dataclass
class AgentConfig:
    # The controller replicas: "host:port,host:port" (tried in turn, failing over) or one
    # gRPC target whose resolver names them all ("dns:///controllers.internal:50051").
    controller: str = "127.0.0.1:50051"
    host_id: str = field(default_factory=socket.gethostname)
    state_dir: str = "/var/lib/vmm-agent"
    # Backends to offer, in order; empty offers every one this host can run.
    backends: list[str] = field(default_factory=list)
    firecracker_binary: str = ""
    cloud_hypervisor_binary: str = ""
    qemu_binary: str = ""
    # Drive the API simulators even where a real binary exists.
    force_simulator: bool = False
    # Capacity to report; 0 means what the machine has.
    vcpus: int = 0
    memory_bytes: int = 0
    cpu_overcommit_ratio: float = 4.0
    memory_overcommit_ratio: float = 1.0
    # Seconds between heartbeats until the controller sends its own setting.
    heartbeat_interval: float = 2.0
    # Per-VM metrics: seconds between samples of each VM, and how many VMs are sampled at
    # once. Heartbeats carry a VM's metrics only when they were sampled since the last beat.
    metrics_interval: float = 10.0
    metrics_concurrency: int = 32
    # host:port of the agent's Prometheus endpoint (GET /metrics); empty serves none.
    metrics_listen: str = "127.0.0.1:9464"
    # Longest wait between attempts to reach the controller (jittered exponential backoff).
    reconnect_backoff_max: float = 30.0
    # This host's credential, which speaks for host_id only: its token from the
    # controller's access file, and/or TLS: the CA that signed the controller's
    # certificate, and this agent's own certificate (SAN URI spiffe://vmm/host/<host_id>)
    # and key for mutual TLS.
    token: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    shutdown_timeout: float = 10.0
    boot_timeout: float = 60.0
    # QEMU acceleration: auto (KVM where the guest can boot under it, else TCG) | kvm | tcg.
    qemu_accel: str = "auto"
    # Stop and remove every VM when the agent exits (for throwaway local setups only:
    # normally VMs outlive agent restarts and are adopted).
    stop_vms_on_exit: bool = False
    # Host path policy: every file a VM config names must resolve under one of these
    # directories; block (and VFIO) devices must match one of the allowlist's globs.
    host_path_roots: list[str] = field(default_factory=lambda: ["/var/lib/vmm"])
    host_device_allowlist: list[str] = field(default_factory=list)
    # Hypervisors run as one uid of this range per VM ("low-high"; empty: as the agent's
    # own user), with this gid, in a cgroup under cgroup_parent (empty: none) limited to
    # the VM's vCPUs, its memory plus the overhead allowance, and hypervisor_pids_max.
    hypervisor_uids: str = "64000-64999"
    hypervisor_gid: int = 64000
    cgroup_parent: str = "vmm"
    hypervisor_memory_overhead_bytes: int = 512 << 20
    hypervisor_pids_max: int = 512
    # Firecracker's jailer (empty: Firecracker runs without): a chroot per VM under
    # jailer_chroot_base, joining jailer_netns (a network namespace path) if one is set.
    jailer_binary: str = ""
    jailer_chroot_base: str = "/srv/jailer"
    jailer_netns: str = ""
    labels: list[str] = field(default_factory=list)
    # Make and remove the TAP devices of NICs that name a bridge (needs CAP_NET_ADMIN).
    manage_network: bool = True
    # Bridges to create at start where missing (VM NICs attach to any bridge the host has).
    bridges: list[str] = field(default_factory=list)
    log_level: str = "info"

    def binary_for(self, backend: str) -> str:
        return str(getattr(self, backend.replace("-", "_") + "_binary", "") or "")

    def label_map(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.labels if "=" in item)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


ENV_PREFIX = "VMM_AGENT_"
# Environment variables of the previous release, read for this one only when the setting
# is not given otherwise: the variable each now stands for.
DEPRECATED_ENV = {
    "VMM_FIRECRACKER_BINARY": f"{ENV_PREFIX}FIRECRACKER_BINARY",
    "VMM_CLOUD_HYPERVISOR_BINARY": f"{ENV_PREFIX}CLOUD_HYPERVISOR_BINARY",
}


def load(argv: list[str] | None = None) -> AgentConfig:
    return load_settings(AgentConfig, argv, prog="vmm-agent",
                         description="The vmm-control-plane agent.",
                         table="agent", env_prefix=ENV_PREFIX)


def apply_deprecated_environment(config: AgentConfig) -> list[str]:
    """Take settings left empty from DEPRECATED_ENV; one warning for each variable set."""
    warnings = []
    for old, new in DEPRECATED_ENV.items():
        value = os.environ.get(old)
        if not value:
            continue
        name = new.removeprefix(ENV_PREFIX).lower()
        if getattr(config, name):
            warnings.append(f"{old} is deprecated and ignored here: {name} is already set; "
                            f"unset {old}")
        else:
            setattr(config, name, value)
            warnings.append(f"{old} is deprecated and will stop working in the next release; "
                            f"set {new} instead")
    return warnings


def binary_from_environment(backend: str) -> str:
    """The binary the environment names for a backend, as the agent reads it: its
    VMM_AGENT_<BACKEND>_BINARY, else the deprecated name; "" when neither is set."""
    new = f"{ENV_PREFIX}{backend.replace('-', '_').upper()}_BINARY"
    old = next((name for name, current in DEPRECATED_ENV.items() if current == new), "")
    return os.environ.get(new) or (os.environ.get(old, "") if old else "")
