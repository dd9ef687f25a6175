"""The controller's operational surface: HTTP health, gRPC health, reflection, tracing,
and UNAVAILABLE while etcd is down."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tools.fleet.cluster import Cluster, wait_until
from vmm.v1 import vm_pb2


def http_health(cluster: Cluster) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{cluster.http_port}/_/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_health_has_the_spec_shape_and_turns_503_without_etcd(cluster: Cluster) -> None:
    cluster.add_agent("h1")
    status, body = http_health(cluster)
    assert status == 200
    assert body["status"] == "healthy"
    assert "firecracker" in str(body["backend"])
    assert isinstance(body["uptime_seconds"], int)
    cluster.etcd.kill()
    status, body = http_health(cluster)
    assert status == 503 and body["status"] == "unhealthy"


def test_grpc_health_and_reflection(cluster: Cluster) -> None:
    assert cluster.channel is not None
    health = health_pb2_grpc.HealthStub(cluster.channel)
    for service in ("", "vmm.v1.VmService", "vmm.v1.HostService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # What grpcurl does with no .proto at hand.
    database = ProtoReflectionDescriptorDatabase(cluster.channel)
    services = set(database.get_services())
    assert {"vmm.v1.VmService", "vmm.v1.HostService", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("vmm.v1.VmService")
    assert "CreateVm" in service.methods_by_name
    assert pool.FindMessageTypeByName("vmm.v1.VmConfig").fields_by_name["cpu"].number == 1


def test_reflection_answers_v1_as_current_clients_ask_first(cluster: Cluster) -> None:
    assert cluster.channel is not None
    call = cluster.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    listed, found = call(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="vmm.v1.VmService"),
    ]), timeout=30)
    services = {s.name for s in listed.list_services_response.service}
    assert {"vmm.v1.VmService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in found.file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "vmm/v1/vm.proto" and f.service[0].name == "VmService"
               for f in files)


def test_calls_fail_unavailable_while_etcd_is_down(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    cluster.etcd.kill()
    with pytest.raises(grpc.RpcError) as err:
        cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="x", config=example("ci-runner")),
                             timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "etcd" in err.value.details()
    assert cluster.channel is not None
    health = health_pb2_grpc.HealthStub(cluster.channel)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status
               == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
    cluster.etcd.start()
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status
               == health_pb2.HealthCheckResponse.SERVING, what="SERVING again")
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="x", config=example("ci-runner")))
    assert created.state == vm_pb2.VM_STATE_CREATED


def test_a_span_per_rpc_and_per_agent_operation(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.restart_controller_with(["--telemetry-exporter", "console"])
    cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="traced", config=example("ci-runner")))
    cluster.vms.ListVms(vm_pb2.ListVmsRequest())
    cluster.controller.stop()  # flushes the span processor
    log = cluster.controller.log.read_text()
    for name in ("/vmm.v1.VmService/CreateVm", "/vmm.v1.VmService/ListVms", "agent.preflight",
                 "agent.apply"):
        assert f'"name": "{name}"' in log, name
    assert '"rpc.grpc.status_code": 0' in log
    assert '"vmm.vm_id": "traced"' in log
