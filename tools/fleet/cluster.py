"""A whole control plane on this machine: real etcd, the controller and agents as separate
processes. Used by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from agent.cgroups import Hierarchy, VmCgroups, agent_group
from tools.fleet.etcd_server import EtcdCluster, EtcdServer, free_loopback_port
from tools.guests.images import default_cache_dir
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Process:
    """A project process (controller or agent) with its log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send sig; for a signal that ends the process, wait until it has."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig not in (signal.SIGSTOP, signal.SIGCONT):
                self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_serving(self, channel: grpc.Channel, timeout: float = 30.0) -> None:
        """Wait until the process answers on channel; fail at once, with its log, if it
        exits first (a port it could not bind, say) rather than at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} "
                                       f"before serving:\n{self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not serve within {timeout} s:\n"
                                       f"{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel (plaintext too)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(  # type: ignore[attr-defined, no-any-return]
            metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation: Callable[..., object],
                              client_call_details: grpc.ClientCallDetails,
                              request: object) -> object:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., object],
                               client_call_details: grpc.ClientCallDetails,
                               request: object) -> object:
        return continuation(self._with_token(client_call_details), request)


def channel_with_token(address: str, token: str) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(address), BearerToken(token))


def etcd_leader(members: list[EtcdServer]) -> EtcdServer | None:
    """The member that is the raft leader now, from each member's own metrics."""
    for member in members:
        if not member.running:
            continue
        try:
            with urllib.request.urlopen(f"http://{member.endpoint}/metrics", timeout=2) as r:
                if re.search(rb"^etcd_server_is_leader 1$", r.read(), re.MULTILINE):
                    return member
        except OSError:
            continue
    return None


class Cluster:
    def __init__(self, workdir: Path, operation_timeout: float = 20.0,
                 etcd_members: int = 1) -> None:
        self.workdir = workdir
        # With several members, `etcd` is the first of them and the controllers know all.
        self.etcd_cluster = EtcdCluster(workdir / "etcd", etcd_members) \
            if etcd_members > 1 else None
        self.etcd = self.etcd_cluster.members[0] if self.etcd_cluster else \
            EtcdServer(workdir / "etcd")
        self.port = free_loopback_port()
        self.http_port = free_loopback_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.operation_timeout = operation_timeout
        self.controller = self._controller_process("controller", self.address,
                                                   [f"--http-listen=127.0.0.1:{self.http_port}"])
        self.agents: dict[str, Process] = {}
        self.replicas: list[Process] = []
        self.channel: grpc.Channel | None = None
        # With an access file: the admin token the cluster's own channel presents.
        self.token = ""

    def _controller_process(self, name: str, address: str, extra: list[str]) -> Process:
        return Process(name, [
            sys.executable, "-m", "controller.main", "--listen", address,
            "--etcd-endpoints", ",".join(self.etcd_endpoints),
            "--operation-timeout", str(self.operation_timeout), "--host-lease-ttl", "3",
            "--identity", name, "--log-level", "debug", *extra],
            self.workdir / f"{name}.log", self.env)

    def add_controller(self, name: str, extra: list[str] | None = None) -> tuple[Process, str]:
        """Another controller replica on the same etcd (no HTTP health port)."""
        address = f"127.0.0.1:{free_loopback_port()}"
        replica = self._controller_process(name, address, ["--http-listen=", *(extra or [])])
        replica.start()
        self.replicas.append(replica)
        with grpc.insecure_channel(address) as channel:
            replica.wait_serving(channel)
        return replica, address

    @property
    def etcd_endpoints(self) -> list[str]:
        return self.etcd_cluster.endpoints if self.etcd_cluster else [self.etcd.endpoint]

    @property
    def vms(self) -> vm_pb2_grpc.VmServiceStub:
        assert self.channel is not None
        return vm_pb2_grpc.VmServiceStub(self.channel)

    @property
    def hosts(self) -> host_pb2_grpc.HostServiceStub:
        assert self.channel is not None
        return host_pb2_grpc.HostServiceStub(self.channel)

    def start(self) -> None:
        if self.etcd_cluster:
            self.etcd_cluster.start()
        else:
            self.etcd.start()
        self.start_controller()
        plain = grpc.insecure_channel(self.address)
        self.controller.wait_serving(plain)
        self.channel = (grpc.intercept_channel(plain, BearerToken(self.token)) if self.token
                        else plain)

    def start_controller(self) -> None:
        self.controller.start()

    def restart_controller(self) -> None:
        self.controller.stop()
        self.controller.start()

    def restart_controller_with(self, extra: list[str]) -> None:
        """Restart the controller with more flags (later flags win)."""
        self.controller.stop()
        self.controller.argv += extra
        self.controller.start()
        assert self.channel is not None
        self.controller.wait_serving(self.channel)

    def add_agent(self, host_id: str, vcpus: int = 8, memory: int = 16 * GIB,
                  backends: str = "firecracker", extra: list[str] | None = None,
                  env: dict[str, str] | None = None, controller: str = "",
                  host_path_roots: list[Path] | None = None,
                  simulated: bool = True, jailed: bool = False) -> Process:
        """An agent process. VM files are allowed under host_path_roots: by default the
        cluster's work dir, the temp dir (where tests make their files) and the built
        guest images. `simulated` makes it drive the Firecracker and Cloud Hypervisor API
        simulators even where real binaries exist (the stand-in kernels such tests boot
        load only there); False lets it use what it finds or `extra` names. Hypervisors
        always get a cgroup; only `jailed` runs them as their own uids, which needs a work
        dir those uids can reach (pytest's tmp_path is not: its ancestors are private to
        root)."""
        if simulated:
            extra = ["--force-simulator", "true", *(extra or [])]
        state = self.workdir / f"agent-{host_id}"
        roots = host_path_roots if host_path_roots is not None else [
            self.workdir, Path(tempfile.gettempdir()), default_cache_dir()]
        agent = Process(f"agent-{host_id}", [
            sys.executable, "-m", "agent.main", "--controller", controller or self.address,
            "--host-id", host_id, "--state-dir", str(state), "--backends", backends,
            "--vcpus", str(vcpus), "--memory-bytes", str(memory),
            "--cpu-overcommit-ratio", "1.0", "--memory-overcommit-ratio", "1.0",
            "--heartbeat-interval", "0.5", "--shutdown-timeout", "3", "--log-level", "debug",
            "--stop-vms-on-exit", "true",
            "--host-path-roots", ",".join(str(root) for root in roots),
            *([] if jailed else ["--hypervisor-uids", ""]),
            *(extra or [])], self.workdir / f"agent-{host_id}.log", {**self.env, **(env or {})})
        agent.start()
        self.agents[host_id] = agent
        self.wait_host_ready(host_id)
        return agent

    def wait_host_ready(self, host_id: str, timeout: float = 20.0) -> host_pb2.Host:
        def ready() -> host_pb2.Host | None:
            try:
                host = self.hosts.GetHost(host_pb2.GetHostRequest(host_id=host_id)).host
            except grpc.RpcError:
                return None
            return host if host.health == host_pb2.HOST_HEALTH_READY else None

        result = wait_until(ready, timeout, what=f"host {host_id} to be ready")
        assert isinstance(result, host_pb2.Host)
        return result

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.log_tail()}"
                 for p in [self.controller, *self.replicas, *self.agents.values()]]
        return "\n".join(parts)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for agent in self.agents.values():
            agent.stop()
        for replica in self.replicas:
            replica.stop()
        self.controller.stop()
        if self.etcd_cluster:
            self.etcd_cluster.close()
        else:
            self.etcd.close()
        kill_leftover_hypervisors(self.workdir)


def kill_leftover_hypervisors(workdir: Path) -> None:
    """A failed test must not leave hypervisor processes behind."""
    for runtime_file in workdir.glob("agent-*/vms/*/runtime.json"):
        try:
            pid = json.loads(runtime_file.read_text()).get("pid")
            if isinstance(pid, int):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    remove_leftover_cgroups(workdir)


def remove_leftover_cgroups(workdir: Path) -> None:
    """Nor the cgroups of its agents (under the default cgroup_parent)."""
    hierarchy = Hierarchy.detect()
    if hierarchy is None:
        return
    for state in workdir.glob("agent-*/"):
        groups = VmCgroups(hierarchy, "vmm", agent_group(state))
        deadline = time.monotonic() + 5  # killed processes leave their groups a moment later
        while groups.names() and time.monotonic() < deadline:
            groups.remove_all_but(set())
            time.sleep(0.05)
        groups.remove_own_group_if_empty()
