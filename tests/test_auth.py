"""Who may do what: agent and client credentials, roles, namespaces, TLS, reloading.

One controller serves API clients with TLS on its main port and agents with mutual TLS on
a port of their own; tokens and certificates come from an access file. Every impersonation
is refused and changes nothing.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.auth import RPC_PERMISSIONS
from tests.conftest import FAKE_KERNEL
from tools.fleet.cluster import ROOT, Cluster, Process, wait_until
from tools.fleet.etcd_server import free_loopback_port
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.v1 import host_pb2, host_pb2_grpc, network_pb2, vm_pb2, vm_pb2_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command to make test certificates")

TOKENS = {"admin": "t-admin", "operator": "t-operator", "viewer": "t-viewer",
          "team-a": "t-team-a", "team-b": "t-team-b", "host-a": "t-host-a",
          "host-b": "t-host-b"}

ACCESS = f"""
[[agents]]
host_id = "host-a"
token = "{TOKENS['host-a']}"

[[agents]]
host_id = "host-b"
token = "{TOKENS['host-b']}"

[[clients]]
name = "admin"
role = "admin"
namespaces = ["*"]
token = "{TOKENS['admin']}"

[[clients]]
name = "operator"
role = "operator"
token = "{TOKENS['operator']}"

[[clients]]
name = "viewer"
role = "viewer"
namespaces = ["default", "team-a"]
token = "{TOKENS['viewer']}"

[[clients]]
name = "team-a"
role = "operator"
namespaces = ["team-a"]
token = "{TOKENS['team-a']}"

[[clients]]
name = "team-b"
role = "operator"
namespaces = ["team-b"]
token = "{TOKENS['team-b']}"

[[clients]]
name = "cert-admin"
role = "admin"
namespaces = ["*"]
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> Path:
    """A CA; a server certificate for 127.0.0.1; agent certificates naming host-a and
    host-b; a client certificate naming cert-admin."""
    d.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=test-ca", "-keyout", "ca.key",
            "-out", "ca.crt", cwd=d)
    sans = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "host-a": "subjectAltName=URI:spiffe://vmm/host/host-a",
            "host-b": "subjectAltName=URI:spiffe://vmm/host/host-b",
            "client": "subjectAltName=URI:spiffe://vmm/client/cert-admin"}
    for name, ext in sans.items():
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.crt", cwd=d)
    return d


class Secure:
    """The controller under test: its addresses, certificates and access file."""

    def __init__(self, cluster: Cluster, pki: Path, access: Path, agent_address: str) -> None:
        self.cluster, self.pki, self.access = cluster, pki, access
        self.address, self.agent_address = cluster.address, agent_address
        self.kernel = access.parent / "vmlinux"
        self.kernel.write_bytes(FAKE_KERNEL)

    def tls(self, cert: str | None = None, token: str | None = None) -> grpc.ChannelCredentials:
        pki = self.pki
        creds = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.crt").read_bytes(),
            private_key=(pki / f"{cert}.key").read_bytes() if cert else None,
            certificate_chain=(pki / f"{cert}.crt").read_bytes() if cert else None)
        if token is None:
            return creds
        return grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))

    def api(self, who: str | None) -> grpc.Channel:
        return grpc.secure_channel(self.address, self.tls(token=TOKENS[who] if who else None))

    def agent_channel(self, cert: str | None, token: str | None = None) -> grpc.Channel:
        return grpc.secure_channel(self.agent_address, self.tls(cert, token))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    tmp = tmp_path_factory.mktemp("auth")
    pki = make_pki(tmp / "pki")
    access = tmp / "access.toml"
    access.write_text(ACCESS)
    c = Cluster(tmp)
    agent_address = f"127.0.0.1:{free_loopback_port()}"
    try:
        c.etcd.start()
        c.controller.argv += [
            "--access-file", str(access), "--agent-listen", agent_address,
            "--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
            "--tls-agent-ca-file", str(pki / "ca.crt")]
        c.controller.start()
        c.channel = grpc.secure_channel(c.address, Secure(c, pki, access, "").tls(
            token=TOKENS["admin"]))
        c.controller.wait_serving(c.channel)
        secure = Secure(c, pki, access, agent_address)
        # host-a's real agent, by its certificate on the agents' port.
        c.add_agent("host-a", controller=agent_address, extra=[
            "--tls-ca-file", str(pki / "ca.crt"), "--tls-cert-file", str(pki / "host-a.crt"),
            "--tls-key-file", str(pki / "host-a.key")])
        yield secure
    finally:
        c.close()


def test_every_rpc_has_a_permission() -> None:
    """A new RPC must be placed in the table: one missing from it is refused to everyone."""
    methods = {f"/{service.full_name}/{method.name}"
               for module in (vm_pb2, host_pb2, network_pb2, agent_pb2)
               for service in module.DESCRIPTOR.services_by_name.values()
               for method in service.methods}
    assert methods == set(RPC_PERMISSIONS)


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call() if callable(call) else None
    return err.value.code()  # type: ignore[no-any-return]


def connect_as(channel: grpc.Channel, host_id: str, metadata: tuple[tuple[str, str], ...] = ()
               ) -> grpc.RpcError:
    """Open the agent stream and register as host_id; the error that ends it."""
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    register = agent_pb2.ConnectRequest(register=agent_pb2.Register(
        host_id=host_id, capacity=host_pb2.Resources(vcpus=64, memory_bytes=64 << 30)))
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Connect(iter([register]), metadata=metadata, timeout=10):
            pass
    return err.value


def host_record(secure: Secure, host_id: str) -> host_pb2.Host:
    hosts = host_pb2_grpc.HostServiceStub(secure.cluster.channel)
    return hosts.GetHost(host_pb2.GetHostRequest(host_id=host_id)).host


def test_a_client_credential_never_opens_the_agent_stream(secure: Secure) -> None:
    before = host_record(secure, "host-a")
    for who in ("admin", "operator"):
        with grpc.secure_channel(secure.address, secure.tls()) as channel:
            error = connect_as(channel, "host-a", (("authorization", f"Bearer {TOKENS[who]}"),))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        assert "only an agent's credential" in error.details()
    # A client certificate on the agents' port is no agent either.
    with secure.agent_channel("client") as channel:
        assert connect_as(channel, "host-a").code() == grpc.StatusCode.PERMISSION_DENIED
    after = host_record(secure, "host-a")
    assert after.health == host_pb2.HOST_HEALTH_READY
    assert after.capacity == before.capacity


def test_an_agent_speaks_only_for_its_own_host(secure: Secure) -> None:
    before = host_record(secure, "host-a")
    # host-b's certificate, and host-b's token, registering as host-a.
    with secure.agent_channel("host-b") as channel:
        error = connect_as(channel, "host-a")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "host-b only" in error.details()
    with grpc.secure_channel(secure.address, secure.tls()) as channel:
        error = connect_as(channel, "host-a", (("authorization", f"Bearer {TOKENS['host-b']}"),))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # host-a's certificate with host-b's token: two different callers.
    with secure.agent_channel("host-a", TOKENS["host-b"]) as channel:
        assert connect_as(channel, "host-a").code() == grpc.StatusCode.PERMISSION_DENIED
    after = host_record(secure, "host-a")
    assert after.health == host_pb2.HOST_HEALTH_READY
    assert after.capacity == before.capacity  # the 64-vCPU fake never registered
    with pytest.raises(grpc.RpcError) as err:
        host_record(secure, "host-b")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_agent_credential_is_not_an_api_client(secure: Secure) -> None:
    with grpc.secure_channel(secure.address, secure.tls(token=TOKENS["host-a"])) as channel:
        for call in (lambda: vm_pb2_grpc.VmServiceStub(channel).ListVms(
                         vm_pb2.ListVmsRequest(), timeout=10),
                     lambda: host_pb2_grpc.HostServiceStub(channel).ListHosts(
                         host_pb2.ListHostsRequest(), timeout=10)):
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
    with secure.agent_channel("host-a") as channel:
        assert code_of(lambda: vm_pb2_grpc.VmServiceStub(channel).CreateVm(
            vm_pb2.CreateVmRequest(vm_id="by-agent"), timeout=10)) \
            == grpc.StatusCode.PERMISSION_DENIED


def test_calls_need_a_known_credential(secure: Secure) -> None:
    for token in (None, "wrong"):
        with grpc.secure_channel(secure.address, secure.tls(token=token)) as channel:
            error = code_of(lambda: vm_pb2_grpc.VmServiceStub(channel).ListVms(
                vm_pb2.ListVmsRequest(), timeout=10))
            assert error == grpc.StatusCode.UNAUTHENTICATED
            # Probes need none.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Plaintext to a TLS port never gets as far as a status from the controller.
    with grpc.insecure_channel(secure.address) as channel:
        assert code_of(lambda: vm_pb2_grpc.VmServiceStub(channel).ListVms(
            vm_pb2.ListVmsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def vm_config(kernel: Path) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(
        cpu=vm_pb2.CpuConfig(vcpu_count=1), memory=vm_pb2.MemoryConfig(size_bytes=128 << 20),
        boot=vm_pb2.BootConfig(kernel_path=str(kernel)))


def test_roles_decide_per_rpc(secure: Secure) -> None:
    with secure.api("viewer") as channel:
        stub = vm_pb2_grpc.VmServiceStub(channel)
        error = code_of(lambda: stub.CreateVm(vm_pb2.CreateVmRequest(
            vm_id="viewer-vm", config=vm_config(secure.kernel)), timeout=10))
        assert error == grpc.StatusCode.PERMISSION_DENIED
        assert stub.ListVms(vm_pb2.ListVmsRequest(), timeout=10).total_count == 0
        assert code_of(lambda: stub.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="x"), timeout=10)) \
            == grpc.StatusCode.PERMISSION_DENIED
    with secure.api("operator") as channel:
        stub = vm_pb2_grpc.VmServiceStub(channel)
        error = code_of(lambda: stub.MigrateVm(vm_pb2.MigrateVmRequest(vm_id="x"), timeout=10))
        assert error == grpc.StatusCode.PERMISSION_DENIED
        # Operators may create (this one in its own namespace only).
        created = stub.CreateVm(vm_pb2.CreateVmRequest(
            vm_id="op-vm", config=vm_config(secure.kernel)), timeout=30)
        assert created.vm_id == "op-vm"
        assert code_of(lambda: stub.CreateVm(vm_pb2.CreateVmRequest(
            vm_id="op-vm-2", namespace="team-a", config=vm_config(secure.kernel)), timeout=10)) \
            == grpc.StatusCode.PERMISSION_DENIED
        stub.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="op-vm", force=True), timeout=30)
    listed = vm_pb2_grpc.VmServiceStub(secure.cluster.channel).ListVms(
        vm_pb2.ListVmsRequest(namespace="*"))
    assert [v.vm_id for v in listed.vms] == []


def test_a_namespace_sees_and_touches_only_its_own_vms(secure: Secure) -> None:
    with secure.api("team-a") as a_channel, secure.api("team-b") as b_channel:
        a = vm_pb2_grpc.VmServiceStub(a_channel)
        b = vm_pb2_grpc.VmServiceStub(b_channel)
        a.CreateVm(vm_pb2.CreateVmRequest(vm_id="a-vm", namespace="team-a",
                                          config=vm_config(secure.kernel)), timeout=30)
        info = a.GetVmInfo(vm_pb2.GetVmInfoRequest(vm_id="a-vm"), timeout=10)
        assert info.namespace == "team-a"
        watch = b.WatchVms(vm_pb2.WatchVmsRequest(namespace="*"), timeout=3)
        # B cannot tell a-vm from a VM that does not exist.
        for vm_id in ("a-vm", "no-such-vm"):
            for rpc, request in ((b.GetVmInfo, vm_pb2.GetVmInfoRequest(vm_id=vm_id)),
                                 (b.BootVm, vm_pb2.BootVmRequest(vm_id=vm_id)),
                                 (b.DeleteVm, vm_pb2.DeleteVmRequest(vm_id=vm_id, force=True)),
                                 (b.GetConsoleLog, vm_pb2.GetConsoleLogRequest(vm_id=vm_id))):
                with pytest.raises(grpc.RpcError) as err:
                    rpc(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert err.value.details() == f"vm {vm_id!r} not found"
        assert b.ListVms(vm_pb2.ListVmsRequest(namespace="*"), timeout=10).total_count == 0
        assert b.ListVms(vm_pb2.ListVmsRequest(namespace="team-b"), timeout=10).vms == []
        assert code_of(lambda: b.ListVms(vm_pb2.ListVmsRequest(namespace="team-a"),
                                         timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        # Changes of a-vm (here its deletion) never reach B's watch.
        a.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="a-vm", force=True), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            events = list(watch)
            assert events == []
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Deleted by A, as the admin sees.
    admin = vm_pb2_grpc.VmServiceStub(secure.cluster.channel)
    assert admin.ListVms(vm_pb2.ListVmsRequest(namespace="*")).total_count == 0


def test_credentials_reload_without_a_restart(secure: Secure) -> None:
    def list_with(token: str) -> grpc.StatusCode:
        with grpc.secure_channel(secure.address, secure.tls(token=token)) as channel:
            try:
                vm_pb2_grpc.VmServiceStub(channel).ListVms(vm_pb2.ListVmsRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

    original = secure.access.read_text()
    try:
        secure.access.write_text(original + '\n[[clients]]\nname = "late"\nrole = "viewer"\n'
                                 'token = "t-late"\n')
        wait_until(lambda: list_with("t-late") == grpc.StatusCode.OK, 15,
                   what="the new client's token to be accepted")
        secure.access.write_text("this is [ not toml")  # refused; the last good file stays
        time.sleep(2.5)
        assert list_with("t-late") == grpc.StatusCode.OK
    finally:
        secure.access.write_text(original)
    wait_until(lambda: list_with("t-late") == grpc.StatusCode.UNAUTHENTICATED, 15,
               what="the removed client's token to be refused")


def test_vmmctl_presents_a_client_certificate(secure: Secure, tmp_path: Path) -> None:
    """A controller that wants client certificates from API clients (tls_client_ca_file),
    and takes a new server certificate without a restart."""
    c, pki = secure.cluster, secure.pki
    address = f"127.0.0.1:{free_loopback_port()}"
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki / "server.crt", cert)
    shutil.copy(pki / "server.key", key)
    replica = Process("cert-replica", [
        sys.executable, "-m", "controller.main", "--listen", address, "--http-listen=",
        "--etcd-endpoints", c.etcd.endpoint, "--identity", "cert-replica",
        "--access-file", str(secure.access), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-client-ca-file", str(pki / "ca.crt")],
        tmp_path / "cert-replica.log", c.env)
    replica.start()
    try:
        def vmmctl(*flags: str, ca: Path = pki / "ca.crt") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "tools.vmmctl", "--server", address, "--ca-cert",
                 str(ca), *flags, "--timeout", "10", "-o", "json", "-n", "*",
                 "list"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

        with_cert = ("--client-cert", str(pki / "client.crt"),
                     "--client-key", str(pki / "client.key"))
        result = wait_until(lambda: (r := vmmctl(*with_cert)).returncode == 0 and r, 30,
                            what="the replica to serve vmmctl")
        assert isinstance(result, subprocess.CompletedProcess)
        assert json.loads(result.stdout)["total_count"] == 0
        # Without a certificate the TLS handshake fails, token or not.
        refused = vmmctl("--token", TOKENS["admin"])
        assert refused.returncode != 0
        # A server certificate from another CA, swapped in on disk, serves new connections.
        rotated = make_pki(tmp_path / "rotated")
        shutil.copy(rotated / "server.key", key)
        shutil.copy(rotated / "server.crt", cert)
        wait_until(lambda: vmmctl(*with_cert, ca=rotated / "ca.crt").returncode == 0, 30,
                   what="the rotated server certificate to be served")
        assert vmmctl(*with_cert).returncode != 0  # the old CA no longer verifies it
    finally:
        replica.stop()


def test_a_withdrawn_agent_token_ends_its_stream(secure: Secure) -> None:
    outbound: queue.Queue[agent_pb2.ConnectRequest | None] = queue.Queue()
    outbound.put(agent_pb2.ConnectRequest(register=agent_pb2.Register(
        host_id="host-b", capacity=host_pb2.Resources(vcpus=2, memory_bytes=2 << 30))))

    def requests() -> Iterator[agent_pb2.ConnectRequest]:
        while (item := outbound.get()) is not None:
            yield item

    original = secure.access.read_text()
    with grpc.secure_channel(secure.address, secure.tls()) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            requests(), metadata=(("authorization", f"Bearer {TOKENS['host-b']}"),), timeout=60)
        try:
            assert next(call).HasField("desired_state")  # registered
            secure.access.write_text(original.replace(f'token = "{TOKENS["host-b"]}"',
                                                      'token = "t-host-b-rotated"'))
            with pytest.raises(grpc.RpcError) as err:
                for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            outbound.put(None)
            secure.access.write_text(original)
