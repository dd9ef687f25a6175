"""The fleet benchmark: the controller with 100, 1,000 and 10,000 hollow hosts.

Per fleet size, from scratch: a fresh etcd and a controller process (tools/fleet/cluster.py),
the etcd transaction baseline against that etcd, then hollow agents (tools/fleet/hollow.py) in
worker processes. It measures how long until every host is READY through the HostService,
the controller's idle CPU and RSS with the fleet connected, and CreateVm throughput and
latency from 64 concurrent clients. Each phase has a time budget; a size that runs out of
time reports how far it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from controller.etcd import Compare, EtcdClient, Op
from tools.bench.measure import rss_mib, summary_ms
from tools.fleet.cluster import Cluster, Process
from tools.fleet.hollow import ready_count
from vmm.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc

DEFAULT_SIZES = (100, 1000, 10_000)
CLIENTS = 64
WRITERS = 64
PREFIX = "hollow-"
# Hosts per hollow worker process (at most two workers on this machine).
HOSTS_PER_WORKER = 5000
# The hollow preflight checks no files, so any kernel path will do.
KERNEL = "/var/lib/vmm/hollow/vmlinux"
# The idle window: controller CPU is averaged over it, and no session may drop in it.
IDLE_SECONDS = 300.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]


def small_config() -> vm_pb2.VmConfig:
    config = vm_pb2.VmConfig()
    config.cpu.vcpu_count = 1
    config.memory.size_bytes = 128 << 20
    config.boot.kernel_path = KERNEL
    config.boot.kernel_args = "console=ttyS0"
    return config


# ---- the etcd baseline --------------------------------------------------------------------


async def etcd_txn_baseline(endpoint: str, writers: int, total: int,
                            budget: float) -> dict[str, Any]:
    """Create-shaped transactions per second: each puts a new key (create_revision == 0)
    and the writer's counter key (compared on its mod_revision), like Store.create_vm puts a
    VM record and its host's allocation."""
    latencies: list[float] = []
    failed = 0
    ids = itertools.count()
    deadline = time.monotonic() + budget

    async with EtcdClient([endpoint], timeout=10.0) as etcd:
        async def writer(w: int) -> None:
            nonlocal failed
            counter = f"/bench/counters/{w}"
            revision = 0
            while time.monotonic() < deadline:
                i = next(ids)
                if i >= total:
                    return
                key = f"/bench/vms/{i}"
                start = time.perf_counter()
                result = await etcd.txn(
                    compares=[Compare.create_revision(key) == 0,
                              Compare.mod_revision(counter) == revision],
                    success=[Op.put(key, b"v" * 256), Op.put(counter, str(i).encode())],
                    failure=[Op.get(counter)])
                latencies.append(time.perf_counter() - start)
                if result.succeeded:
                    revision = result.revision
                else:
                    failed += 1
                    kv = await etcd.get(counter)
                    revision = kv.mod_revision if kv else 0

        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - start
        await etcd.delete_prefix("/bench/")
    done = len(latencies) - failed
    return {"writers": writers, "txns": done, "failed_compares": failed,
            "seconds": round(elapsed, 2), "txns_per_second": round(done / elapsed, 1),
            "latency": summary_ms(latencies) if latencies else {}}


# ---- the phases -----------------------------------------------------------------------------


async def wait_registered(address: str, hosts: int, budget: float) -> dict[str, Any]:
    """Until the HostService lists every hollow host READY, or the budget runs out.

    While hosts are still registering it asks only for the host count (a one-host page), so
    the polling does not load the controller it measures; then it pages through all hosts
    until every one is READY."""
    start = time.monotonic()
    listed, ready, error = 0, 0, ""
    interval = 0.1 if hosts <= 1000 else 0.5
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = host_pb2_grpc.HostServiceStub(channel)
        while time.monotonic() - start < budget:
            try:
                if listed < hosts:
                    listed = (await stub.ListHosts(host_pb2.ListHostsRequest(page_size=1),
                                                   timeout=30)).total_count
                if listed >= hosts:
                    ready = await ready_count(stub, PREFIX)
                error = ""
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            if ready >= hosts:
                break
            await asyncio.sleep(interval)
    out: dict[str, Any] = {"hosts_listed": listed, "hosts_ready": ready,
                           "seconds": round(time.monotonic() - start, 2),
                           "complete": ready >= hosts}
    if error:
        out["last_error"] = error
    return out


def sessions_closed(http_port: int) -> float:
    """Agent sessions the controller has seen end, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "vmm_agent_sessions_closed" for sample in family.samples
               if sample.name.endswith("_total"))


def idle_usage(pid: int, http_port: int, seconds: float) -> dict[str, Any]:
    proc = psutil.Process(pid)
    closed = sessions_closed(http_port)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    return {"cpu_cores": round(busy / seconds, 3), "seconds": seconds, "rss_mib": rss_mib(pid),
            "session_drops": int(sessions_closed(http_port) - closed)}


async def create_throughput(address: str, clients: int, total: int,
                            budget: float) -> dict[str, Any]:
    """CreateVm calls per second from `clients` concurrent callers, each on its own channel
    share of a few channels; stops at `total` creates or when the budget runs out."""
    config = small_config()
    ids = itertools.count()
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    deadline = time.monotonic() + budget
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    try:
        async def client(c: int) -> None:
            stub = vm_pb2_grpc.VmServiceStub(channels[c % len(channels)])
            while time.monotonic() < deadline:
                i = next(ids)
                if i >= total:
                    return
                start = time.perf_counter()
                try:
                    await stub.CreateVm(vm_pb2.CreateVmRequest(vm_id=f"bench-{i}",
                                                               config=config),
                                        timeout=max(1.0, deadline - time.monotonic()))
                    codes["OK"] += 1
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    ok = codes["OK"]
    return {"clients": clients, "attempted": sum(codes.values()), "created": ok,
            "outcomes": dict(codes), "seconds": round(elapsed, 2),
            "creates_per_second": round(ok / elapsed, 1) if elapsed else 0.0,
            "latency": summary_ms(latencies) if latencies else {},
            "complete": ok == total}


def last_log_message(log: Path, marker: str) -> str:
    """The last message in a controller log that contains marker ("" when none does)."""
    found = ""
    with contextlib.suppress(OSError), open(log, errors="replace") as lines:
        for line in lines:
            if marker in line:
                found = line.partition('msg="')[2].rstrip().rstrip('"') or line.strip()
    return found


def etcd_rss_mib(cluster: Cluster) -> float | None:
    """RSS of the cluster's etcd member, found by its client port."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and "etcd" in Path(cmdline[0]).name \
                and any(cluster.etcd.endpoint in arg for arg in cmdline):
            with contextlib.suppress(psutil.Error):
                return rss_mib(proc.pid)
    return None


def run_size(hosts: int, quick: bool, work: Path) -> dict[str, Any]:
    # Enough creates for several seconds at full speed: 600 took under 3 s, ramp-up included.
    creates = 200 if quick else 3000
    register_budget = 60.0 if hosts <= 1000 else 300.0
    create_budget = 60.0 if hosts <= 1000 else 180.0
    cluster = Cluster(work, operation_timeout=30)
    # Later flags win: no debug logging, a lease long enough for a loaded controller.
    cluster.controller.argv += ["--log-level", "info", "--host-lease-ttl", "10"]
    result: dict[str, Any] = {"hosts": hosts}
    hollow: Process | None = None
    try:
        cluster.start()
        result["etcd_txn_baseline"] = asyncio.run(etcd_txn_baseline(
            cluster.etcd.endpoint, WRITERS, 2000 if quick else 6000, budget=30.0))
        workers = max(1, min(2, -(-hosts // HOSTS_PER_WORKER)))
        hollow = Process("hollow", [
            sys.executable, "-m", "tools.fleet.hollow", "--controller", cluster.address,
            "--hosts", str(hosts), "--processes", str(workers), "--prefix", PREFIX,
            "--sizes", "64x256"], work / "hollow.log", cluster.env)
        hollow.start()
        result["hollow_processes"] = workers
        result["registration"] = asyncio.run(
            wait_registered(cluster.address, hosts, register_budget))
        result["controller_idle"] = idle_usage(cluster.controller.pid, cluster.http_port,
                                               30.0 if quick else IDLE_SECONDS)
        result["heartbeat_retune"] = last_log_message(cluster.controller.log,
                                                      "heartbeat interval now")
        result["etcd_rss_mib"] = etcd_rss_mib(cluster)
        result["create_throughput"] = asyncio.run(
            create_throughput(cluster.address, CLIENTS, creates, create_budget))
        result["controller_rss_after_creates_mib"] = rss_mib(cluster.controller.pid)
    except Exception as exc:  # reported, so the other sizes still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["controller_log_tail"] = cluster.controller.log_tail(20)
    finally:
        if hollow is not None:
            hollow.stop()
        cluster.close()
    return result


def bench_fleet(quick: bool, sizes: Sequence[int] | None = None) -> dict[str, Any]:
    sizes = list(sizes or ((100, 1000) if quick else DEFAULT_SIZES))
    runs: list[dict[str, Any]] = []
    for hosts in sizes:
        print(f"-- fleet of {hosts} hollow hosts", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-fleet-{hosts}-") as tmp:
            run = run_size(hosts, quick, Path(tmp))
        print(f"   {summary_line(run)}", flush=True)
        runs.append(run)
    add_ratios(runs)
    return {"fleet_sizes": sizes, "clients": CLIENTS, "vm": "1 vCPU, 128 MiB",
            "runs": runs}


def add_ratios(runs: list[dict[str, Any]]) -> None:
    base = next((r for r in runs if r["hosts"] == 100), runs[0] if runs else None)
    base_rate = _rate(base) if base else 0.0
    for run in runs:
        rate = _rate(run)
        etcd = run.get("etcd_txn_baseline", {}).get("txns_per_second", 0.0)
        run["ratios"] = {
            f"creates_per_second_vs_{base['hosts'] if base else 0}_hosts":
                round(rate / base_rate, 3) if base_rate else None,
            "creates_per_second_vs_etcd_txns_per_second": round(rate / etcd, 3) if etcd else None,
        }


def _rate(run: dict[str, Any]) -> float:
    return float(run.get("create_throughput", {}).get("creates_per_second", 0.0))


def summary_line(run: dict[str, Any]) -> str:
    reg = run.get("registration", {})
    idle = run.get("controller_idle", {})
    tp = run.get("create_throughput", {})
    etcd = run.get("etcd_txn_baseline", {})
    parts = [f"ready {reg.get('hosts_ready', 0)}/{run['hosts']} in {reg.get('seconds', '-')}s",
             f"idle {idle.get('cpu_cores', '-')} cores {idle.get('rss_mib', '-')} MiB "
             f"{idle.get('session_drops', '-')} session drops in {idle.get('seconds', '-')}s",
             f"creates {tp.get('creates_per_second', '-')}/s "
             f"p50 {tp.get('latency', {}).get('p50_ms', '-')} ms "
             f"p99 {tp.get('latency', {}).get('p99_ms', '-')} ms",
             f"etcd {etcd.get('txns_per_second', '-')} txn/s"]
    if "error" in run:
        parts.append(f"error {run['error']}")
    return "; ".join(parts)

