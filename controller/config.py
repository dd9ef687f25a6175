"""Controller configuration: defaults that work on one machine, a TOML file, environment
variables (VMM_CONTROLLER_<FIELD>) and flags, in increasing order of precedence."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmm.common.settings import load_settings


@dataclass
class ControllerConfig:
    # gRPC API and agent endpoint.
    listen: str = "127.0.0.1:50051"
    # HTTP health endpoint (/_/health); empty disables it.
    http_listen: str = "127.0.0.1:8080"
    etcd_endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    etcd_prefix: str = "/vmm/"
    # Seconds an RPC waits for the agent to carry out a change.
    operation_timeout: float = 30.0
    # A connected agent silent this long is DEGRADED and gets no new VMs. The controller
    # stretches it with the heartbeat interval, keeping their ratio.
    heartbeat_timeout: float = 15.0
    # Seconds between an agent's heartbeats while the fleet on this replica is small (at
    # most a third of heartbeat_timeout); the controller tells each agent its interval.
    heartbeat_interval: float = 2.0
    # Heartbeats per second one replica asks of its agents at most: with more hosts than
    # heartbeat_interval * max_heartbeat_rate, the interval grows with the fleet. Each beat
    # costs the controller ~150 us of a core it shares with placement, so at 10,000 hosts
    # (a 20 s interval) heartbeats take 0.08 core. Nomad's servers default to 50 a second.
    max_heartbeat_rate: float = 500.0
    # How many agent registrations (etcd writes of the host record and alive key) run at once.
    max_concurrent_registrations: int = 64
    # TTL in seconds of this replica's etcd lease, which holds the alive keys of its hosts:
    # when the replica dies, its hosts count as disconnected this long after.
    host_lease_ttl: int = 10
    # Fencing timeout: a VM deleted while its host is away keeps its resources reserved
    # (it may still run there) until the host confirms the removal, or until the host has
    # been away this many seconds; then it is forgotten (the agent removes it when it
    # returns).
    forget_deleted_after: float = 60.0
    # Seconds after which a deletion a connected host has not confirmed is sent again.
    removal_retry_interval: float = 10.0
    # Seconds the answer to a call carrying a request_id is kept for its retries (AIP-155).
    request_id_retention: float = 3600.0
    # Name of this replica in the leader election; empty means hostname:listen.
    identity: str = ""
    # Hotplug-ready VMs reserve their maximum vCPUs and memory on the host.
    reserve_hotplug_maximum: bool = True
    backend_preference: list[str] = field(
        default_factory=lambda: ["firecracker", "cloud-hypervisor", "qemu"])
    # Agent and client credentials, roles and namespace quotas (TOML; see
    # controller/access.py). Re-read when it changes and on SIGHUP. Empty: no access
    # control (every caller is an admin and may speak for any host).
    access_file: str = ""
    # A second port for the agent stream only; empty serves agents on `listen`.
    agent_listen: str = ""
    # TLS on both ports when a certificate is given. Client CA: API clients on `listen`
    # must present a certificate it signed. Agent CA: agents on `agent_listen` must.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_agent_ca_file: str = ""
    # Largest request message accepted, in bytes (larger ones get RESOURCE_EXHAUSTED).
    max_request_bytes: int = 1 << 20
    # OpenTelemetry exporter: none | console | otlp.
    telemetry_exporter: str = "none"
    log_level: str = "info"


def load(argv: list[str] | None = None) -> ControllerConfig:
    return load_settings(ControllerConfig, argv, prog="vmm-controller",
                         description="The vmm-control-plane controller.",
                         table="controller", env_prefix="VMM_CONTROLLER_")
