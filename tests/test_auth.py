"""TLS, mutual TLS for agents, and bearer tokens on the controller's gRPC port."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.fleet.cluster import ROOT, Cluster
from vmm.v1 import host_pb2, vm_pb2, vm_pb2_grpc

TOKEN = "s3cret-token"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command to make test certificates")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("agent", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.crt", cwd=d)
    return d


def tls(pki: Path, token: str | None) -> grpc.ChannelCredentials:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "agent.key").read_bytes(),
        certificate_chain=(pki / "agent.crt").read_bytes())
    if token is None:
        return creds
    return grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))


@pytest.fixture
def secure_cluster(tmp_path: Path, pki: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.etcd.start()
        c.controller.argv += [
            "--auth-tokens", TOKEN, "--tls-cert-file", str(pki / "server.crt"),
            "--tls-key-file", str(pki / "server.key"),
            "--tls-client-ca-file", str(pki / "ca.crt")]
        c.controller.start()
        c.channel = grpc.secure_channel(c.address, tls(pki, TOKEN))
        grpc.channel_ready_future(c.channel).result(timeout=20)
        yield c
    finally:
        c.close()


def test_calls_need_a_valid_token(secure_cluster: Cluster, pki: Path) -> None:
    for token in (None, "wrong"):
        with grpc.secure_channel(secure_cluster.address, tls(pki, token)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                vm_pb2_grpc.VmServiceStub(channel).ListVms(vm_pb2.ListVmsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in err.value.details()
            # Probes need no token.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert secure_cluster.vms.ListVms(vm_pb2.ListVmsRequest()).total_count == 0


def test_plaintext_is_refused(secure_cluster: Cluster) -> None:
    with grpc.insecure_channel(secure_cluster.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            vm_pb2_grpc.VmServiceStub(channel).ListVms(vm_pb2.ListVmsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_agent_with_certificate_and_token_registers(secure_cluster: Cluster, pki: Path) -> None:
    secure_cluster.add_agent("h1", extra=[
        "--token", TOKEN, "--tls-ca-file", str(pki / "ca.crt"),
        "--tls-cert-file", str(pki / "agent.crt"), "--tls-key-file", str(pki / "agent.key")])
    host = secure_cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id="h1")).host
    assert host.health == host_pb2.HOST_HEALTH_READY


def test_vmmctl_speaks_tls_with_a_token(secure_cluster: Cluster, pki: Path) -> None:
    # The CLI has no client certificate: mutual TLS is for agents, so a controller that
    # wants it refuses the CLI; one without a client CA takes the token alone.
    secure_cluster.controller.stop()
    secure_cluster.controller.argv = [a for a in secure_cluster.controller.argv
                                      if "client-ca" not in a and a != str(pki / "ca.crt")]
    secure_cluster.controller.start()
    secure_cluster.vms.ListVms(vm_pb2.ListVmsRequest(), wait_for_ready=True, timeout=20)
    result = subprocess.run(
        [sys.executable, "-m", "tools.vmmctl", "--server", secure_cluster.address,
         "--token", TOKEN, "--ca-cert", str(pki / "ca.crt"), "-o", "json", "list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_count"] == 0
