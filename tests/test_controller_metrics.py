"""The controller's /metrics: Prometheus text from a real controller over real HTTP,
after a real agent connected and a VM was placed on its host."""

from __future__ import annotations

import gzip
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tools.fleet.cluster import Cluster, wait_until
from vmm.v1 import host_pb2, vm_pb2


def scrape(cluster: Cluster, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """The body of GET /metrics, decompressed, and its Content-Type."""
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.http_port}/metrics",
                                     headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body.decode(), resp.headers["Content-Type"]


def samples(text: str) -> dict[str, list[Sample]]:
    """Samples by name (parsed the way Prometheus' own client library parses them)."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float | None:
    for sample in found.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_metrics_show_the_fleet_after_a_vm_is_created(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1", vcpus=8, memory=16 << 30)
    created = cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="m1", config=example("ci-runner")))
    assert created.state == vm_pb2.VM_STATE_CREATED
    host = cluster.hosts.GetHost(host_pb2.GetHostRequest(host_id="h1")).host
    assert (host.allocated.vcpus, host.allocated.memory_bytes) == (2, 2 << 30)

    text, content_type = scrape(cluster)
    assert content_type.startswith("text/plain")
    kinds = families(text)
    assert kinds["vmm_hosts"] == "gauge"
    assert kinds["vmm_vms"] == "gauge"
    assert kinds["vmm_host_heartbeat_lag_seconds"] == "gauge"
    assert kinds["vmm_placement_duration_seconds"] == "histogram"
    assert kinds["vmm_placements"] == "counter"
    assert kinds["vmm_placement_conflicts"] == "counter"
    found = samples(text)

    # Hosts by health: the one connected host is READY, heartbeating.
    assert value(found, "vmm_hosts", health="READY") == 1
    assert value(found, "vmm_hosts", health="DEGRADED") == 0
    lag = value(found, "vmm_host_heartbeat_lag_seconds", host_id="h1")
    assert lag is not None and 0 <= lag < 5

    # VMs by observed state and backend, zeros for the other states.
    assert value(found, "vmm_vms", state="CREATED", backend="firecracker") == 1
    assert value(found, "vmm_vms", state="RUNNING", backend="firecracker") == 0

    # Placements by host and backend; no conflicts with one writer.
    assert value(found, "vmm_placements_total", host_id="h1", backend="firecracker") == 1
    assert value(found, "vmm_placement_conflicts_total") == 0

    # The host's allocation as reserved for the VM, and what it offers.
    # Read from the fleet's in-memory index (Fleet.index): absent without it.
    assert value(found, "vmm_host_allocated_vcpus", host_id="h1") == 2
    assert value(found, "vmm_host_allocated_memory_bytes", host_id="h1") == 2 << 30
    assert value(found, "vmm_host_allocatable_vcpus", host_id="h1") == 8
    assert value(found, "vmm_host_allocatable_memory_bytes", host_id="h1") == 16 << 30

    # Placement latency: passes once controller/placement.py calls
    # telemetry.observe_placement(seconds, outcome) for each placement.
    count = value(found, "vmm_placement_duration_seconds_count", outcome="placed")
    assert count is not None and count >= 1, \
        "no placement latency observed: placement.py does not call observe_placement yet"
    total = value(found, "vmm_placement_duration_seconds_sum", outcome="placed")
    assert total is not None and total > 0


def test_metrics_follow_state_changes_and_deletes(
        cluster: Cluster, example: Callable[[str], vm_pb2.VmConfig]) -> None:
    cluster.add_agent("h1")
    cluster.vms.CreateVm(vm_pb2.CreateVmRequest(vm_id="m2", config=example("ci-runner")))
    cluster.vms.BootVm(vm_pb2.BootVmRequest(vm_id="m2"))

    def running() -> dict[str, list[Sample]] | None:
        found = samples(scrape(cluster)[0])
        return found if value(found, "vmm_vms", state="RUNNING",
                              backend="firecracker") == 1 else None

    found = wait_until(running, what="the VM counted RUNNING")
    assert isinstance(found, dict)
    assert value(found, "vmm_vms", state="CREATED", backend="firecracker") == 0
    changes = value(found, "vmm_vm_state_changes_total", state="RUNNING")
    assert changes is not None and changes >= 1

    cluster.vms.DeleteVm(vm_pb2.DeleteVmRequest(vm_id="m2", force=True))

    def gone() -> bool:
        found = samples(scrape(cluster)[0])
        return not found.get("vmm_vms") and value(found, "vmm_vm_deletions_total") == 1

    wait_until(gone, what="no VM counted, one deletion")


def test_metrics_speak_openmetrics_and_gzip_when_asked(cluster: Cluster) -> None:
    cluster.add_agent("h1")
    text, content_type = scrape(cluster, {
        "Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        "Accept-Encoding": "gzip"})
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "vmm_hosts{health=\"READY\"} 1.0" in text
    # The process' own series come with the controller's.
    assert "process_resident_memory_bytes" in text
