"""The agent process: adopt what runs, connect to the controller, reconcile, sample VM
metrics and serve them to Prometheus."""

from __future__ import annotations

# First, before anything loads grpc: it reads its I/O setting once, when it loads.
from vmm.common.grpc_io import prefer_poll_based_io

prefer_poll_based_io()

import asyncio
import contextlib
import logging
import resource
import signal
from pathlib import Path

from agent import config as config_module
from agent import process
from agent.cgroups import Hierarchy, VmCgroups, agent_group
from agent.config import AgentConfig
from agent.firecracker_jail import FirecrackerJailer
from agent.host_paths import HostPathPolicy
from agent.jail import HypervisorJail, JailSettings, parse_uid_range
from agent.metrics import AgentTelemetry, MetricsSampler, serve_metrics
from agent.network.host import HostNetwork
from agent.reconciler import Reconciler
from agent.runtimes import RUNTIME_CLASSES, detect_runtimes
from agent.runtimes.base import Runtime, RuntimeSettings
from agent.session import ControllerSession
from agent.vm_dir import StateDir
from vmm.common.logs import setup_logging

log = logging.getLogger("vmm.agent")


def runtime_settings(config: AgentConfig) -> dict[str, RuntimeSettings]:
    return {
        backend: RuntimeSettings(
            binary=config.binary_for(backend) or None, force_simulator=config.force_simulator,
            default_shutdown_timeout=config.shutdown_timeout, boot_timeout=config.boot_timeout,
            accel=config.qemu_accel,
            host_path_roots=HostPathPolicy.of(config.host_path_roots).roots,
            jailer=jailer(config) if backend == "firecracker" else None)
        for backend in RUNTIME_CLASSES
    }


def jailer(config: AgentConfig) -> FirecrackerJailer | None:
    if not config.jailer_binary:
        return None
    if not config.hypervisor_uids:
        raise SystemExit("jailer_binary needs hypervisor_uids: the jailer runs Firecracker "
                         "as a VM's own uid")
    return FirecrackerJailer(config.jailer_binary, Path(config.jailer_chroot_base),
                             config.jailer_netns)


def jail_settings(config: AgentConfig) -> JailSettings:
    vm_cgroups = None
    if config.cgroup_parent:
        hierarchy = Hierarchy.detect()
        if hierarchy is None:
            raise SystemExit("no cgroup hierarchy with the cpu, memory and pids controllers: "
                             "mount one, or set cgroup_parent empty to run without")
        # One group per agent (named by its state dir), so that each removes only its own.
        vm_cgroups = VmCgroups(hierarchy, config.cgroup_parent,
                               agent_group(config.state_path))
    return JailSettings(uids=parse_uid_range(config.hypervisor_uids),
                        gid=config.hypervisor_gid, cgroups=vm_cgroups,
                        memory_overhead_bytes=config.hypervisor_memory_overhead_bytes,
                        pids_max=config.hypervisor_pids_max)


class Agent:
    def __init__(self, config: AgentConfig, runtimes: dict[str, Runtime] | None = None) -> None:
        self.config = config
        self.state = StateDir(config.state_path)
        self.runtimes = runtimes if runtimes is not None else detect_runtimes(
            runtime_settings(config), config.backends or None)
        settings = RuntimeSettings(default_shutdown_timeout=config.shutdown_timeout,
                                   boot_timeout=config.boot_timeout)
        jail = HypervisorJail(self.state, jail_settings(config))
        network = HostNetwork(config.host_id, jail.uid_of) if config.manage_network else None
        host_paths = HostPathPolicy.of(config.host_path_roots, config.host_device_allowlist)
        self.reconciler = Reconciler(self.state, self.runtimes, self._report, settings,
                                     network, host_paths, jail)
        self.sampler = MetricsSampler(self.reconciler, config.metrics_interval,
                                      config.metrics_concurrency)
        self.telemetry = AgentTelemetry(self.reconciler, self.sampler, config.host_id)
        self.session = ControllerSession(config, self.reconciler, self.runtimes,
                                         self.sampler, self.telemetry)

    def _report(self, status: object) -> None:
        self.session.report(status)  # type: ignore[arg-type]

    async def run(self, stop: asyncio.Event) -> None:
        for name, runtime in self.runtimes.items():
            log.info("backend %s: %s%s", name, runtime.binary,
                     " (simulated)" if runtime.simulated else "")
        log.info("VM files allowed under %s; devices matching %s",
                 ", ".join(self.reconciler.host_paths.roots) or "nothing",
                 ", ".join(self.reconciler.host_paths.device_allowlist) or "nothing")
        if not self.runtimes:
            log.warning("no backend is available on this host")
        if self.reconciler.network is not None:
            await self.reconciler.network.ensure_bridges(self.config.bridges)
        adopted = await self.reconciler.adopt_all()
        log.info("adopted %d VMs from %s", len(adopted), self.state.root)
        self.reconciler.start_monitor()
        self.sampler.start()
        async with serve_metrics(self.telemetry, self.config.metrics_listen):
            session = asyncio.create_task(self.session.run_forever(),
                                          name="controller-session")
            await stop.wait()
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session
        await self.sampler.stop()
        if self.config.stop_vms_on_exit:
            log.info("stopping every VM before exit")
            await self.reconciler.stop_all()
        await self.reconciler.stop()
        self.reconciler.jail.close()
        process.stop_standby()


async def serve(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Agent(config).run(stop)


def raise_open_files_limit() -> None:
    """Every VM holds open files in the agent (its kept API connection, console relays):
    allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    config = config_module.load(argv)
    setup_logging(config.log_level, "agent")
    for warning in config_module.apply_deprecated_environment(config):
        log.warning("%s", warning)
    if config.log_level.lower() != "debug":
        # One line per hypervisor API request (metrics samples included) is debug detail.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    raise_open_files_limit()
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
