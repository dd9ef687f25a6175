"""The agent's host reconciler: make the hypervisor processes match the desired VM set.

Level-triggered: every pass compares what the controller wants (DesiredVm) with what
runs (Runtime.observe) and acts on the difference, so repeating a pass is harmless.
Each VM has a lock, so operations on one VM never overlap while different VMs proceed
in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine

from agent import hotplug, process, restarts
from agent.guest_panic import PANIC_REASON, PanicScanner
from agent.host_paths import HostPathPolicy, refuse
from agent.jail import HypervisorJail, JailSettings
from agent.network.guest import with_ip_args
from agent.network.host import HostNetwork
from agent.runtimes.base import (
    GuestNotReady,
    Observation,
    Runtime,
    RuntimeFailure,
    RuntimeSettings,
    with_console_tail,
)
from agent.vm_dir import STEPS, Phase, StateDir, VmDir
from vmm.agent.v1 import agent_pb2
from vmm.common import failpoints
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)
S = vm_pb2.VmState

# Seconds between liveness checks of running hypervisors.
MONITOR_INTERVAL = 0.5
# Hypervisors asked about their state at once while adopting after a restart.
ADOPT_CONCURRENCY = 32
# VMs checked between yields to the event loop: a pass over a thousand VMs takes a while.
MONITOR_BATCH = 50
# States _observe gives only a VM whose hypervisor process it found running.
_LIVE_STATES = frozenset({S.VM_STATE_CREATED, S.VM_STATE_RUNNING, S.VM_STATE_PAUSED})


class Reconciler:
    def __init__(self, state: StateDir, runtimes: dict[str, Runtime],
                 report: Callable[[agent_pb2.VmStatus], None],
                 settings: RuntimeSettings | None = None,
                 network: HostNetwork | None = None,
                 host_paths: HostPathPolicy | None = None,
                 jail: HypervisorJail | None = None) -> None:
        self.state = state
        # Makes and removes the VMs' TAPs; None leaves host devices alone (NICs name
        # existing TAPs only).
        self.network = network
        # Each VM's NICs as the host runs them (TAP, MAC, address).
        self.nics: dict[str, list[vm_pb2.NetworkInterfaceStatus]] = {}
        self.host_paths = host_paths or HostPathPolicy()
        self.jail = jail or HypervisorJail(state, JailSettings())
        self.runtimes = runtimes
        self.report = report
        self.settings = settings or RuntimeSettings()
        self.desired: dict[str, agent_pb2.DesiredVm] = {}
        # What each VM's desired.json holds, so that an unchanged desired state (a
        # controller restating the whole set) costs no write.
        self._saved: dict[str, agent_pb2.DesiredVm] = {}
        self.status: dict[str, agent_pb2.VmStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self.panics = PanicScanner()
        # Restarts the VMs' restart policies have scheduled, and those under way.
        self._restart_timers: dict[str, asyncio.Task[None]] = {}
        self._restarting: set[str] = set()

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # ---- start-up: adopt what runs ----------------------------------------------------

    async def adopt_all(self) -> list[agent_pb2.VmStatus]:
        """Find the VMs of a previous agent run and learn their state. A hypervisor is kept
        only where its progress is proved (see `_proven`); any other is stopped, and the
        next reconcile recreates it from the desired spec."""
        unproven: list[VmDir] = []
        limit = asyncio.Semaphore(ADOPT_CONCURRENCY)

        async def adopt(vm: VmDir) -> None:
            desired = vm.load_desired()
            if desired is None:
                log.warning("state dir %s has no desired.json; it will be removed", vm.path)
                self.status[vm.vm_id] = agent_pb2.VmStatus(vm_id=vm.vm_id)
                return
            self.desired[vm.vm_id] = self._saved[vm.vm_id] = desired
            if self.network is not None:
                resolved = await self.network.resolve(vm.vm_id, desired.config)
                self.nics[vm.vm_id] = self.network.status(resolved)
            async with limit:
                status, stray = await self._adopt(vm, desired)
            if stray:
                unproven.append(vm)
            saved = vm.load_status()
            # The restart count is the VM's, not this agent run's.
            self._apply_restart_policy(vm.vm_id, saved, status)
            self.status[vm.vm_id] = status
            vm.save_status(status)
            log.info("adopted vm %s: %s pid %d, generation %d", vm.vm_id, S.Name(status.state),
                     status.pid, status.observed_generation, extra={"vm_id": vm.vm_id})

        await asyncio.gather(*(adopt(vm) for vm in self.state.existing()))
        if unproven:
            await self._stop_strays(unproven)
        if self.network is not None:
            await self.network.sweep({vm_id: d.config for vm_id, d in self.desired.items()})
        for name in self.jail.remove_leftovers():
            log.info("removed cgroup %s, which belongs to no VM", name)
        return list(self.status.values())

    async def _adopt(self, vm: VmDir, desired: agent_pb2.DesiredVm
                     ) -> tuple[agent_pb2.VmStatus, bool]:
        """The VM's status as proved, and whether a step under way may have spawned a
        hypervisor it never recorded."""
        last = vm.load_status()
        phase = vm.load_phase()
        runtime = self.runtimes.get(desired.backend)
        obs = await runtime.observe(vm) if runtime is not None else None
        if runtime is not None and obs is not None and obs.alive \
                and not _proven(phase, obs.state):
            log.warning("vm %s: cannot prove how far its hypervisor got (phase %s, state %s); "
                        "stopping it to recreate it from the desired spec", vm.vm_id,
                        phase.step if phase else "none", S.Name(obs.state),
                        extra={"vm_id": vm.vm_id})
            await runtime.destroy(vm)
            obs = None
        # A stop that was under way and whose process is gone has done its job.
        stopping = phase is not None and phase.under_way \
            and phase.step in ("stopping", "rebooting") and not (obs and obs.alive)
        status = await self._observe(vm, desired, stopped_on_request=stopping, observed=obs)
        # What was carried out is what was last reported, not what desired.json asks for.
        status.observed_generation = last.observed_generation if last else 0
        status.reboot_epoch = last.reboot_epoch if last else 0
        under_way = phase is not None and phase.under_way
        return status, under_way and not (obs and obs.alive)

    async def _stop_strays(self, vms: list[VmDir]) -> None:
        """Hypervisors spawned by a step the agent died in before recording them: found by
        their VM's API socket on their command line, and stopped."""
        for ref in process.find_by_argument({str(vm.api_socket) for vm in vms}):
            log.warning("stopping unrecorded hypervisor pid %d", ref.pid)
            await process.kill(ref)

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._monitor_forever(), name="vm-monitor")

    async def stop(self) -> None:
        if self._monitor:
            self._monitor.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- desired state in -----------------------------------------------------------

    def set_desired_state(self, vms: list[agent_pb2.DesiredVm]) -> None:
        """The complete desired set: everything else on this host goes."""
        wanted = {vm.vm_id: vm for vm in vms}
        for vm_id in set(self.status) | {v.vm_id for v in self.state.existing()}:
            if vm_id not in wanted:
                self.remove(vm_id, force=True)
        for vm in wanted.values():
            self.set_desired(vm)

    def set_desired(self, vm: agent_pb2.DesiredVm) -> None:
        current = self.desired.get(vm.vm_id)
        if current is not None and current.generation > vm.generation:
            return  # stale message
        self.desired[vm.vm_id] = vm
        self._spawn(self.reconcile(vm.vm_id))

    def remove(self, vm_id: str, force: bool) -> None:
        self.desired.pop(vm_id, None)
        self._spawn(self._remove(vm_id, force))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- one VM -----------------------------------------------------------------------

    async def reconcile(self, vm_id: str) -> None:
        async with self.lock(vm_id):
            desired = self.desired.get(vm_id)
            if desired is None:
                return
            vm = self.state.vm(vm_id)
            if self._saved.get(vm_id) != desired:
                vm.save_desired(desired)
                self._saved[vm_id] = desired
                failpoints.hit("agent.desired.saved", vm_id)
            last = self.status.get(vm_id)
            if last is not None and last.observed_generation == desired.generation \
                    and (last.error or last.state == S.VM_STATE_FAILED) \
                    and vm_id not in self._restarting:
                # A failed generation waits for the controller's next one (or a restart).
                self._publish(vm, last)
                return
            runtime = self.runtimes.get(desired.backend)
            if runtime is None:
                self._publish(vm, agent_pb2.VmStatus(
                    vm_id=vm_id, observed_generation=desired.generation, backend=desired.backend,
                    state=last.state if last else S.VM_STATE_UNSPECIFIED,
                    error=f"backend {desired.backend} is not available on this host",
                    error_code="FAILED_PRECONDITION"))
                return
            error, code = "", ""
            not_ready = False
            try:
                await self._converge(runtime, vm, desired)
            except GuestNotReady as exc:
                error, code, not_ready = exc.message, exc.code, True
                with contextlib.suppress(Exception):  # free what the hung guest holds
                    await runtime.shutdown(vm, True, 0)
            except RuntimeFailure as exc:
                error, code = exc.message, exc.code
            except Exception as exc:  # a bug or an OS error: report it, do not kill the agent
                log.exception("reconciling vm %s failed", vm_id, extra={"vm_id": vm_id})
                error, code = f"{type(exc).__name__}: {exc}", "INTERNAL"
            stopped = not error and desired.power_state == S.VM_STATE_SHUTDOWN
            status = await self._observe(vm, desired, stopped_on_request=stopped)
            status.error, status.error_code = error, code
            if not_ready:
                status.state = S.VM_STATE_FAILED
                status.reason = error
            elif error and not status.reason:
                status.reason = error
            self._publish(vm, status)
            with contextlib.suppress(Exception):
                await self._release_dead(runtime, vm, status)

    async def _converge(self, runtime: Runtime, vm: VmDir, desired: agent_pb2.DesiredVm) -> None:
        last = self.status.get(vm.vm_id)
        actual = (await self._observe(vm, desired)).state
        target = desired.power_state
        policy = desired.shutdown
        timeout = float(policy.timeout_seconds) or self.settings.default_shutdown_timeout

        async def step(name: str, failpoint: str, action: Callable[[], Awaitable[None]]) -> None:
            # The phase before and after each step is what a restarted agent proves from.
            vm.save_phase(name, desired.generation)
            await action()
            failpoints.hit(failpoint, vm.vm_id)
            vm.save_phase(STEPS[name], desired.generation)

        booted = False
        if actual == S.VM_STATE_UNSPECIFIED:  # nothing exists yet
            if target == S.VM_STATE_SHUTDOWN:
                return
            runnable = await self._runnable(vm.vm_id, desired)
            try:
                await step("creating", "agent.vm.created",
                           lambda: runtime.create(vm, runnable))
            except BaseException:
                await self._release_network(vm.vm_id, desired.config)
                raise
            actual = S.VM_STATE_CREATED
        if target == S.VM_STATE_SHUTDOWN:
            if actual != S.VM_STATE_SHUTDOWN:
                force = policy.force or actual != S.VM_STATE_RUNNING
                await step("stopping", "agent.vm.stopped",
                           lambda: runtime.shutdown(vm, force, timeout))
            return
        if target in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED):
            if actual == S.VM_STATE_FAILED and runtime.live_process(vm) is not None:
                # A panicked guest's hypervisor may live on; the boot starts afresh.
                await runtime.shutdown(vm, True, 0)
            if actual in (S.VM_STATE_CREATED, S.VM_STATE_SHUTDOWN, S.VM_STATE_FAILED):
                self.panics.booting(vm)
                runnable = await self._runnable(vm.vm_id, desired)
                await step("booting", "agent.vm.booted", lambda: runtime.boot(vm, runnable))
                actual, booted = S.VM_STATE_RUNNING, True
            elif actual == S.VM_STATE_PAUSED and target == S.VM_STATE_RUNNING:
                await step("resuming", "agent.vm.booted", lambda: runtime.resume(vm))
                actual = S.VM_STATE_RUNNING
            last_epoch = last.reboot_epoch if last else 0
            # A guest this pass booted has just started fresh: that is the reboot.
            if desired.reboot_epoch != last_epoch and actual == S.VM_STATE_RUNNING \
                    and not booted:
                self.panics.booting(vm)
                runnable = await self._runnable(vm.vm_id, desired)
                await step("rebooting", "agent.vm.rebooted",
                           lambda: runtime.reboot(vm, runnable, desired.force_reboot))
            if target == S.VM_STATE_PAUSED and actual == S.VM_STATE_RUNNING:
                await step("pausing", "agent.vm.stopped", lambda: runtime.pause(vm))

    async def _runnable(self, vm_id: str, desired: agent_pb2.DesiredVm) -> agent_pb2.DesiredVm:
        """The desired VM as its hypervisor is to run it: host paths allowed (checked again
        before any process starts, as the files may have changed since preflight) and
        resolved, managed TAPs made and named."""
        desired = self._with_allowed_paths(self.state.vm(vm_id), desired)
        if self.network is None or not desired.config.network:
            self.nics.pop(vm_id, None)
            return desired  # no TAP to make: no trip to the network thread
        runnable = agent_pb2.DesiredVm()
        runnable.CopyFrom(desired)
        runnable.config.CopyFrom(await self.network.attach(
            vm_id, desired.config, self.runtimes.get(desired.backend)))
        with_ip_args(runnable.config)
        self.nics[vm_id] = self.network.status(runnable.config)
        return runnable

    async def _release_network(self, vm_id: str, config: vm_pb2.VmConfig) -> None:
        self.nics.pop(vm_id, None)
        if self.network is not None:
            try:
                await self.network.release(vm_id, config)
            except Exception:
                log.exception("removing the taps of vm %s failed", vm_id,
                              extra={"vm_id": vm_id})
    def _with_allowed_paths(self, vm: VmDir, desired: agent_pb2.DesiredVm
                            ) -> agent_pb2.DesiredVm:
        config, violations = self.host_paths.resolved(desired.config)
        refuse(violations)
        allowed = agent_pb2.DesiredVm()
        allowed.CopyFrom(desired)
        allowed.config.CopyFrom(config)
        vm.link_console_output(config.console.output)
        runtime = self.runtimes.get(desired.backend)
        self.jail.prepare(vm, config, runtime.files_written(vm) if runtime else [])
        return allowed

    async def _observe(self, vm: VmDir, desired: agent_pb2.DesiredVm,
                       stopped_on_request: bool = False,
                       observed: Observation | None = None) -> agent_pb2.VmStatus:
        """The VM's status now, from the live hypervisor and what this agent recorded.

        stopped_on_request: this agent has just shut the VM down, so a missing process
        is a SHUTDOWN VM, not a crash. observed: the runtime's observation, if just made."""
        last = self.status.get(vm.vm_id) or vm.load_status()
        status = agent_pb2.VmStatus(vm_id=vm.vm_id, observed_generation=desired.generation,
                                    backend=desired.backend,
                                    reboot_epoch=desired.reboot_epoch)
        runtime = self.runtimes.get(desired.backend)
        if runtime is None:
            status.state = last.state if last else S.VM_STATE_UNSPECIFIED
            status.reason = f"backend {desired.backend} is not available on this host"
            return status
        obs = observed or await runtime.observe(vm)
        status.pid = obs.pid
        status.backend_info.update(obs.backend_info)
        status.network_interfaces.extend(self.nics.get(vm.vm_id, ()))
        panic = self.panics.scan(vm) if self.panics.booted(vm) or obs.guest_panic else None
        if obs.guest_panic:
            panic = panic or PANIC_REASON
        if obs.alive:
            status.state = obs.state or (last.state if last else S.VM_STATE_CREATED)
            if panic:
                status.state = S.VM_STATE_FAILED
                status.reason = with_console_tail(vm, panic)
            elif status.state == S.VM_STATE_FAILED:
                status.reason = with_console_tail(vm, obs.detail or "the hypervisor failed")
            return status
        created = vm.runtime_file.exists()
        if panic and not stopped_on_request and (last is None or last.state != S.VM_STATE_FAILED):
            status.state = S.VM_STATE_FAILED
            status.reason = with_console_tail(vm, panic)
        elif stopped_on_request:
            status.state = S.VM_STATE_SHUTDOWN
            status.reason = "shut down on request"
        elif last is None or last.state == S.VM_STATE_UNSPECIFIED or (
                not created and last.state not in (S.VM_STATE_SHUTDOWN, S.VM_STATE_FAILED)):
            status.state = S.VM_STATE_UNSPECIFIED
        elif last.state in (S.VM_STATE_SHUTDOWN, S.VM_STATE_FAILED):
            status.state = last.state
            status.reason = last.reason
        elif obs.clean_exit:
            status.state = S.VM_STATE_SHUTDOWN
            status.reason = "the guest powered off"
        else:
            status.state = S.VM_STATE_FAILED
            status.reason = with_console_tail(vm, obs.detail or "the hypervisor process is gone")
        return status

    def _publish(self, vm: VmDir, status: agent_pb2.VmStatus) -> None:
        self._apply_restart_policy(vm.vm_id, self.status.get(vm.vm_id), status)
        changed = self.status.get(vm.vm_id) != status
        self.status[vm.vm_id] = status
        # Report first: the controller's caller waits on it, and the file only helps a
        # restarted agent, which observes the hypervisor again anyway. The file is written
        # once the loop has handed the report to the stream.
        self.report(status)
        if changed:
            asyncio.get_running_loop().call_soon(self._save_status, vm)

    def _save_status(self, vm: VmDir) -> None:
        """Record the VM's status as it is now (a later one may have come meanwhile)."""
        status = self.status.get(vm.vm_id)
        if status is None or not vm.exists():
            return  # removed meanwhile: writing would bring its directory back
        vm.save_status(status)
        failpoints.hit("agent.status.saved", vm.vm_id)

    # ---- restart policy -------------------------------------------------------------

    def _apply_restart_policy(self, vm_id: str, previous: agent_pb2.VmStatus | None,
                              status: agent_pb2.VmStatus) -> None:
        """Carry the restart count into a new status; on a new failure, decide the next
        restart (see agent.restarts) and schedule it."""
        if previous is not None and previous.HasField("restart") \
                and not status.HasField("restart"):
            status.restart.CopyFrom(previous.restart)
        # The first status after a restart starts afresh, whatever it is.
        restarted = vm_id in self._restarting
        self._restarting.discard(vm_id)
        desired = self.desired.get(vm_id)
        if status.state != S.VM_STATE_FAILED or desired is None \
                or desired.power_state not in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED) \
                or not restarts.restarts_on_failure(desired.config.restart_policy):
            return
        if restarted or previous is None or previous.state != S.VM_STATE_FAILED:
            policy = desired.config.restart_policy
            status.restart.CopyFrom(restarts.after_failure(policy, status.restart, time.time()))
            log.info("vm %s: %s", vm_id, restarts.describe(policy, status.restart),
                     extra={"vm_id": vm_id})
        if status.restart.next_restart_timestamp and vm_id not in self._restart_timers:
            self._restart_timers[vm_id] = timer = asyncio.create_task(
                self._restart_when_due(vm_id, status.restart.next_restart_timestamp))
            self._tasks.add(timer)
            timer.add_done_callback(self._tasks.discard)

    async def _restart_when_due(self, vm_id: str, due: float) -> None:
        try:
            await asyncio.sleep(max(0.0, due - time.time()))
        finally:
            self._restart_timers.pop(vm_id, None)
        async with self.lock(vm_id):
            last = self.status.get(vm_id)
            if last is None or last.state != S.VM_STATE_FAILED or vm_id not in self.desired:
                return  # booted, stopped or deleted meanwhile
            last.restart.attempts += 1
            last.restart.next_restart_timestamp = 0
            self.state.vm(vm_id).save_status(last)  # counted before it is tried
            self._restarting.add(vm_id)
            log.info("vm %s: restart %d by its restart policy", vm_id, last.restart.attempts,
                     extra={"vm_id": vm_id})
        await self.reconcile(vm_id)

    async def _remove(self, vm_id: str, force: bool) -> None:
        async with self.lock(vm_id):
            if vm_id in self.desired:
                return  # wanted again meanwhile
            vm = self.state.vm(vm_id)
            last = self.status.get(vm_id) or vm.load_status()
            backend = last.backend if last else ""
            desired = vm.load_desired()
            runtime = self.runtimes.get(backend or (desired.backend if desired else ""))
            if runtime is not None:
                try:
                    await runtime.destroy(vm)
                except Exception:
                    log.exception("destroying vm %s failed", vm_id, extra={"vm_id": vm_id})
            failpoints.hit("agent.vm.destroyed", vm_id)
            if desired is not None:
                await self._release_network(vm_id, desired.config)
            try:
                await self.jail.release(vm)
            except OSError:
                log.exception("releasing the jail of vm %s failed", vm_id,
                              extra={"vm_id": vm_id})
            vm.remove()
            failpoints.hit("agent.vm.removed", vm_id)
            self.status.pop(vm_id, None)
            self.panics.forget(vm_id)
            if timer := self._restart_timers.pop(vm_id, None):
                timer.cancel()
            self._saved.pop(vm_id, None)
            log.info("removed vm %s", vm_id, extra={"vm_id": vm_id})
            self.report(agent_pb2.VmStatus(vm_id=vm_id, removed=True, backend=backend))

    # ---- crash detection ------------------------------------------------------------

    async def _monitor_forever(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            for i, (vm_id, status) in enumerate(list(self.status.items())):
                if i and not i % MONITOR_BATCH:
                    await asyncio.sleep(0)  # let heartbeats and requests through
                if status.state not in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED,
                                        S.VM_STATE_CREATED):
                    continue
                lock = self.lock(vm_id)
                desired = self.desired.get(vm_id)
                runtime = self.runtimes.get(status.backend)
                if lock.locked() or desired is None or runtime is None:
                    continue
                vm = self.state.vm(vm_id)
                if runtime.live_process(vm) is not None and not self._guest_panicked(
                        runtime, vm, status):
                    continue
                async with lock:
                    with contextlib.suppress(Exception):
                        await self._check(runtime, vm, desired, status)

    def _guest_panicked(self, runtime: Runtime, vm: VmDir, status: agent_pb2.VmStatus) -> bool:
        if status.state == S.VM_STATE_CREATED:
            return False
        return self.panics.scan(vm) is not None or runtime.guest_panic_reported(vm)

    async def _check(self, runtime: Runtime, vm: VmDir, desired: agent_pb2.DesiredVm,
                     status: agent_pb2.VmStatus) -> None:
        """Publish what a VM whose process ended or whose guest panicked is now."""
        observed = await self._observe(vm, desired)
        if observed.state == status.state:
            return
        log.warning("vm %s is now %s: %s", vm.vm_id, S.Name(observed.state),
                    observed.reason.splitlines()[0] if observed.reason else "",
                    extra={"vm_id": vm.vm_id})
        self._publish(vm, observed)
        await self._release_dead(runtime, vm, observed)

    async def _release_dead(self, runtime: Runtime, vm: VmDir,
                            status: agent_pb2.VmStatus) -> None:
        """What a dead VM holds goes at once. A panicked guest stays dead (or reboots into
        the same panic): its hypervisor is stopped and the VM stays FAILED. A hypervisor
        that is gone leaves its API socket behind: nothing will answer on it again."""
        if status.state in _LIVE_STATES:
            return  # just observed running: nothing to release (the monitor sees it end)
        if status.state == S.VM_STATE_FAILED and runtime.live_process(vm) is not None:
            await runtime.shutdown(vm, True, 0)
        if runtime.live_process(vm) is None:
            vm.api_socket.unlink(missing_ok=True)

    # ---- requests -------------------------------------------------------------------

    def preflight(self, request: agent_pb2.PreflightRequest) -> list[agent_pb2.FieldViolation]:
        runtime = self.runtimes.get(request.backend)
        if runtime is None:
            return [agent_pb2.FieldViolation(
                field="backend", description=f"{request.backend} is not available on this host")]
        path_violations = self.host_paths.check(request.config)
        if self.network is None:
            return path_violations + runtime.preflight(request.vm_id, request.config)
        config, violations = self.network.preflight(request.vm_id, request.config)
        return path_violations + violations + runtime.preflight(request.vm_id, config)

    async def hotplug(self, request: agent_pb2.HotplugRequest) -> agent_pb2.HotplugResult:
        desired = self.desired.get(request.vm_id)
        if desired is None:
            raise RuntimeFailure(f"vm {request.vm_id} is not on this host", "NOT_FOUND")
        runtime = self.runtimes[desired.backend]
        request = hotplug.with_allowed_paths(self.host_paths, request)
        async with self.lock(request.vm_id):
            vm = self.state.vm(request.vm_id)
            if request.HasField("attach_disk"):
                self.jail.hand_over(vm, request.attach_disk)
            vm.save_phase("hotplugging", desired.generation)
            try:
                config = await hotplug.with_network(self.network, runtime, vm, desired, request)
            except RuntimeFailure:
                # Refused by the hypervisor: the VM runs as it did.
                vm.save_phase(STEPS["hotplugging"], desired.generation)
                raise
            failpoints.hit("agent.vm.hotplugged", request.vm_id)
            if self.network is not None:
                self.nics[vm.vm_id] = self.network.status(config)
            desired.config.CopyFrom(config)
            vm.save_desired(desired)
            self._saved[request.vm_id] = desired
            vm.save_phase(STEPS["hotplugging"], desired.generation)
            status = await self._observe(vm, desired)
            self._publish(vm, status)
            return agent_pb2.HotplugResult(config=config, state=status.state)

    def metrics_targets(self) -> list[tuple[str, str]]:
        """(vm_id, backend) of every VM whose metrics are worth sampling: running or paused
        on a backend this host has."""
        return [(vm_id, status.backend) for vm_id, status in list(self.status.items())
                if status.backend in self.runtimes
                and status.state in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED)]

    async def sample_metrics(self, vm_id: str) -> vm_pb2.VmMetrics | None:
        """One VM's metrics now; None while an operation holds the VM (or it is gone)."""
        status = self.status.get(vm_id)
        runtime = self.runtimes.get(status.backend) if status is not None else None
        if runtime is None or self.lock(vm_id).locked():
            return None
        return await runtime.metrics(self.state.vm(vm_id))

    async def stop_all(self) -> None:
        """Stop and remove every VM (used when the agent runs a throwaway local setup)."""
        for vm_id in list(self.status):
            self.desired.pop(vm_id, None)
            await self._remove(vm_id, force=True)


def _proven(phase: Phase | None, state: vm_pb2.VmState.ValueType) -> bool:
    """Whether a live hypervisor found on restart may be adopted as it is.

    A step recorded as finished proves itself. A step under way is proved only by the
    hypervisor's own API: a started guest (RUNNING, PAUSED) or a stopped one (SHUTDOWN) had
    its configuration complete, but a CREATED one may be a process spawned and never (or
    half) configured, and an interrupted hotplug leaves a config nobody recorded. A state
    dir without a phase comes from an agent that recorded none, and is taken as it was."""
    if phase is None or not phase.under_way:
        return True
    if phase.step == "hotplugging":
        return False
    return state in (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED, S.VM_STATE_SHUTDOWN)
