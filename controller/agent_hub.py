"""The controller's side of the agent protocol: one session per connected host.

Desired state flows down from the VM cache (so writes from any controller replica
reach the host); observed state flows up and is written to the VM records.

Liveness costs etcd nothing per heartbeat: heartbeats are kept in memory, and the alive
keys of all the hosts connected to this replica sit on the replica's one lease
(`controller.liveness.ReplicaLease`), written when a host registers and deleted when its
session closes. The heartbeat interval each agent is told stretches with the number of
hosts connected here (`HeartbeatPolicy`), and registrations run at most
`max_concurrent_registrations` at a time, so a reconnect storm queues instead of
swamping etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from controller.access import Access
from controller.agent_session import AgentSession
from controller.auth import current_caller
from controller.etcd import EtcdError, EtcdUnavailable, LeaseNotFound
from controller.liveness import HeartbeatPolicy, ReplicaLease
from controller.status_writes import StatusWrites
from controller.store import Store, now
from controller.telemetry import Telemetry
from controller.vm_cache import VmCache, VmChange
from controller.wire import undecodable
from vmm.agent.v1 import agent_pb2, agent_pb2_grpc
from vmm.common import failpoints
from vmm.store.v1 import records_pb2
from vmm.v1 import host_pb2, vm_pb2

log = logging.getLogger(__name__)

# Status writes one host may have in flight at once.
STATUS_WRITES_PER_HOST = 32

# Status fields worth a write to etcd when they change (metrics are kept in memory).
_DURABLE_STATUS_FIELDS = ("observed_generation", "state", "reason", "error", "error_code", "pid",
                          "backend", "reboot_epoch", "removed", "network_interfaces")


def desired_message(record: records_pb2.VmRecord) -> agent_pb2.ConnectResponse:
    """What the agent must make true for one VM record."""
    if record.deleting:
        return agent_pb2.ConnectResponse(
            remove_vm=agent_pb2.RemoveVm(vm_id=record.vm_id, force=record.force_delete))
    return agent_pb2.ConnectResponse(desired_vm=desired_vm(record))


def desired_vm(record: records_pb2.VmRecord) -> agent_pb2.DesiredVm:
    return agent_pb2.DesiredVm(
        vm_id=record.vm_id, generation=record.generation, config=record.config,
        backend=record.backend, power_state=record.desired_state, shutdown=record.shutdown,
        reboot_epoch=record.reboot_epoch, force_reboot=record.force_reboot)


def durable_status(status: agent_pb2.VmStatus) -> agent_pb2.VmStatus:
    kept = agent_pb2.VmStatus()
    kept.CopyFrom(status)
    kept.ClearField("metrics")
    kept.ClearField("config")
    return kept


def same_status(record: records_pb2.VmRecord, status: agent_pb2.VmStatus) -> bool:
    """Whether the record already holds the durable part of the status."""
    return all(getattr(record.status, f) == getattr(status, f) for f in _DURABLE_STATUS_FIELDS) \
        and dict(record.status.backend_info) == dict(status.backend_info)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Consume a stream task's outcome: a broken stream is not an unhandled error."""
    if not task.cancelled():
        task.exception()


class Superseded(Exception):
    """A newer stream of the same host registered while this one was registering."""


class AgentHub(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, store: Store, cache: VmCache, telemetry: Telemetry,
                 host_lease_ttl: int = 10, *, heartbeat_interval: float = 2.0,
                 heartbeat_timeout: float = 15.0, max_heartbeat_rate: float = 500.0,
                 max_concurrent_registrations: int = 64,
                 on_host_change: Callable[[str], None] | None = None,
                 removal_retry_interval: float = 10.0) -> None:
        self.store = store
        self.cache = cache
        self.telemetry = telemetry
        self.host_lease_ttl = host_lease_ttl
        self.sessions: dict[str, AgentSession] = {}
        # host id -> time.monotonic() of its last disconnect from this controller.
        self.departed: dict[str, float] = {}
        # Called with a host id when its session opens or closes or its health changes.
        self.on_host_change = on_host_change
        self.lease = ReplicaLease(store.etcd, host_lease_ttl, self._restore_alive)
        self.heartbeats = HeartbeatPolicy(heartbeat_interval, heartbeat_timeout,
                                          max_heartbeat_rate)
        self._registrations = asyncio.Semaphore(max(1, max_concurrent_registrations))
        self.removal_retry_interval = removal_retry_interval
        self._removals: asyncio.Task[None] | None = None
        # The sessions, least recently heard from first.
        self._by_beat: OrderedDict[str, AgentSession] = OrderedDict()
        self._dispatcher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._status_locks: dict[str, asyncio.Lock] = {}
        # Reports written to etcd; a VM change may take its pending report along.
        self.status_writes = StatusWrites(store)
        # Reports being applied; they finish even if their stream ends first.
        self._report_tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.lease.start()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="desired-dispatch")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="heartbeat-sweep")
        self._removals = asyncio.create_task(self._resend_removals_forever(),
                                             name="removal-resend")

    async def stop(self) -> None:
        for task in (self._dispatcher, self._sweeper, self._removals):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.lease.stop()

    # ---- liveness ---------------------------------------------------------------------

    @property
    def heartbeat_interval(self) -> float:
        """The interval the agents connected here are asked to heartbeat at."""
        return self.heartbeats.interval

    @property
    def heartbeat_timeout(self) -> float:
        """How long a connected host may be silent before it counts as DEGRADED (stretched
        with the interval as the fleet on this replica grows)."""
        return self.heartbeats.timeout()

    def health_of(self, session: AgentSession) -> tuple[host_pb2.HostHealth.ValueType, str]:
        """The host's health as placement should see it: what the agent reports, or
        DEGRADED once it has been silent past the heartbeat timeout."""
        silent = time.time() - session.last_heartbeat
        if silent > self.heartbeat_timeout:
            return host_pb2.HOST_HEALTH_DEGRADED, f"no heartbeat for {silent:.0f}s"
        return session.health, session.health_detail

    def heartbeat_settings(self) -> agent_pb2.ConnectResponse:
        return agent_pb2.ConnectResponse(heartbeat_settings=agent_pb2.HeartbeatSettings(
            interval_seconds=self.heartbeats.interval,
            timeout_seconds=self.heartbeats.advertised_timeout))

    def _retune(self) -> bool:
        """Stretch or shrink the heartbeat interval with the hosts connected here; tell every
        agent when it changed by more than the hysteresis (amortised O(1) per session)."""
        if not self.heartbeats.update(len(self.sessions)):
            return False
        log.info("heartbeat interval now %.1fs, timeout %.1fs (%d hosts)",
                 self.heartbeats.interval, self.heartbeats.advertised_timeout,
                 len(self.sessions))
        settings = self.heartbeat_settings()
        for session in self.sessions.values():
            session.send(settings)
        return True

    def _notify(self, host_id: str) -> None:
        if self.on_host_change is None:
            return
        try:
            self.on_host_change(host_id)
        except Exception:
            log.exception("on_host_change(%s) failed", host_id)

    async def _sweep_forever(self) -> None:
        """Mark hosts silent past the timeout; looks only at the least recently heard."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout / 4))
            self.sweep()

    def sweep(self) -> None:
        deadline = time.time() - self.heartbeat_timeout
        for session in list(self._by_beat.values()):
            if session.last_heartbeat >= deadline:
                break
            if not session.silent:
                session.silent = True
                log.warning("host %s silent for %.0fs", session.host_id,
                            time.time() - session.last_heartbeat)
                self._notify(session.host_id)

    async def _resend_removals_forever(self) -> None:
        while True:
            await asyncio.sleep(self.removal_retry_interval)
            self.resend_removals()

    def resend_removals(self) -> None:
        """Deletions a host connected here has not confirmed within the retry interval are
        sent again: a lost removal or report must not leave a record deleting for ever.
        O(the records marked for deletion)."""
        stale = now() - self.removal_retry_interval
        for vm_id in list(self.cache.deleting):
            stored = self.cache.get(vm_id)
            if stored is None or stored.record.modified_timestamp > stale:
                continue
            session = self.sessions.get(stored.record.host_id)
            if session is not None:
                session.send(desired_message(stored.record))

    async def _restore_alive(self, lease_id: int) -> None:
        """After the replica's lease was re-granted: put back the alive keys of the hosts
        still connected here (their old keys went with the old lease)."""
        async def restore(host_id: str, session: AgentSession) -> None:
            async with self._registrations:
                if self.sessions.get(host_id) is not session or \
                        not self.lease.is_current(lease_id):
                    return
                try:
                    revision = await self.store.restore_alive(host_id, lease_id)
                except EtcdError as error:
                    log.warning("could not restore the alive key of host %s: %s",
                                host_id, error)
                    return
                if revision is None:
                    log.warning("host %s is alive on another replica's lease", host_id)
                    return
                session.alive_revision = revision
                if self.sessions.get(host_id) is not session:
                    await self._clear_alive(host_id, revision)

        sessions = list(self.sessions.items())
        await asyncio.gather(*(restore(h, s) for h, s in sessions))
        log.info("alive keys of %d hosts restored on lease %x", len(sessions), lease_id)

    # ---- desired state, down ------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        async with self.cache.subscribe() as changes:
            while True:
                change = await changes.get()
                self._dispatch(change)

    def _dispatch(self, change: VmChange) -> None:
        if change.current is None:
            prev = change.previous
            if prev is not None and (session := self.sessions.get(prev.record.host_id)):
                session.send(agent_pb2.ConnectResponse(
                    remove_vm=agent_pb2.RemoveVm(vm_id=change.vm_id, force=True)))
            return
        record = change.current.record
        prev_rec = change.previous.record if change.previous else None
        # Status-only writes need not go back down.
        if prev_rec is not None and prev_rec.generation == record.generation \
                and prev_rec.deleting == record.deleting:
            return
        session = self.sessions.get(record.host_id)
        if session is not None:
            session.send(desired_message(record))
            failpoints.hit("controller.desired.pushed", record.vm_id)

    # ---- the stream -----------------------------------------------------------------

    async def Connect(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        first = await context.read()
        if undecodable(first):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message is not a valid ConnectRequest")
        if first is grpc.aio.EOF or not first.HasField("register"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the first message on the stream must be register")
        register = first.register
        if not register.host_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register.host_id is required")
        host_id = register.host_id
        caller = current_caller()
        if caller.is_agent and caller.host_id != host_id:
            log.warning("refused %s registering as host %s", caller.describe(), host_id)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"this credential speaks for host {caller.host_id} only, "
                                f"not {host_id}")
        session = AgentSession(host_id)
        session.caller = caller
        opened = False
        try:
            await self._register(session, register)
            opened = True
            # Together, so that the host's reports share transactions (StatusWrites).
            await asyncio.gather(*(self.apply_status(session, status)
                                   for status in register.vms))
            await self._finish_deletions(session, {status.vm_id for status in register.vms})
            del first, register  # what the registration said is in etcd and the fleet now
            reader = asyncio.create_task(self._read(session, context))
            writer = asyncio.create_task(self._write(session, context))
            try:
                done, _ = await asyncio.wait(
                    {reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Also when the handler itself is cancelled (the agent went away).
                for task in (reader, writer):
                    task.cancel()
                    task.add_done_callback(_retrieve)
            for task in done:
                if not task.cancelled() and task.exception():
                    log.info("agent stream of host %s ended: %s", host_id, task.exception())
            if session.revoked:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "this agent's token was withdrawn from the access file")
        except EtcdUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable: {exc}")
        except Superseded as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        finally:
            if opened:
                self._close(session)
            log.info("host %s disconnected", host_id)

    async def _finish_deletions(self, session: AgentSession, reported: set[str]) -> None:
        """Records of this host marked for deletion that its agent does not have: the agent
        removed the VM but its report was lost (or it never had it). Finalise them now;
        O(the host's VMs). Those it does have it removes, as they are not in its desired
        set, and reports as removed."""
        for stored in self.cache.on_host(session.host_id):
            record = stored.record
            if record.deleting and record.vm_id not in reported:
                if await self.store.delete_vm(record.vm_id, expected=stored):
                    log.info("vm %s: deletion finished, host %s no longer has it",
                             record.vm_id, session.host_id, extra={"vm_id": record.vm_id})
                    self.telemetry.vm_deleted(record)

    async def _register(self, session: AgentSession, reg: agent_pb2.Register) -> None:
        """Write the host record and alive key (bounded in concurrency), then open the
        session: it is in `sessions` from here on. O(the host's VMs), never O(fleet)."""
        host_id = reg.host_id
        async with self._registrations:
            existing = await self.store.get_host(host_id)
            record = records_pb2.HostRecord(
                host_id=host_id, hostname=reg.hostname, capacity=reg.capacity,
                cpu_overcommit_ratio=reg.cpu_overcommit_ratio or 1.0,
                memory_overcommit_ratio=reg.memory_overcommit_ratio or 1.0,
                backends=reg.backends, labels=reg.labels, agent_version=reg.agent_version,
                bridges=reg.bridges,
                registered_timestamp=existing.registered_timestamp if existing else now())
            changed = existing is None or existing != record
            while True:
                lease_id = await self.lease.current()
                try:
                    revision = await self.store.mark_alive(host_id, lease_id,
                                                           record if changed else None)
                except LeaseNotFound:
                    self.lease.invalidate(lease_id)
                    continue
                # No await from here to the session's opening: a re-grant either happened
                # before this check (write again) or restores this host's key after it.
                if self.lease.is_current(lease_id):
                    break
            session.alive_revision = revision
            current = self.sessions.get(host_id)
            if current is not None and current.alive_revision > revision:
                # Another stream of the same host registered after this one: it wins.
                raise Superseded(f"host {host_id} registered again on a newer stream")
            self._open(session, reg)

    def drop_withdrawn(self, access: Access) -> None:
        """End the streams of agents whose token the new access file no longer holds."""
        for session in list(self.sessions.values()):
            caller = session.caller
            if caller is None or not caller.credential:
                continue  # open access, or a certificate: the file does not grant those
            holder = access.by_token.get(caller.credential)
            if holder is None or holder.host_id != session.host_id:
                log.warning("host %s: its token was withdrawn; closing its stream",
                            session.host_id)
                session.revoked = True
                session.send(agent_pb2.ConnectResponse())  # wakes the writer

    def _open(self, session: AgentSession, reg: agent_pb2.Register) -> None:
        host_id = session.host_id
        old = self.sessions.get(host_id)
        if old is not None:
            log.warning("host %s reconnected; replacing its previous session", host_id)
            old.send(agent_pb2.ConnectResponse())  # wakes the old writer; it will notice
            self.telemetry.sessions_closed.inc()
        session.last_heartbeat = time.time()
        self.sessions[host_id] = session
        self.telemetry.sessions_opened.inc()
        self._by_beat[host_id] = session
        self._by_beat.move_to_end(host_id)
        desired = [desired_vm(s.record) for s in self.cache.on_host(host_id)
                   if not s.record.deleting]
        session.send(agent_pb2.ConnectResponse(desired_state=agent_pb2.DesiredState(vms=desired)))
        if not self._retune():
            session.send(self.heartbeat_settings())
        log.info("host %s registered: %d backends, %d VMs reported, %d desired", host_id,
                 len(reg.backends), len(reg.vms), len(desired))
        self._notify(host_id)

    def _close(self, session: AgentSession) -> None:
        """Close the session (synchronously: the stream's handler may be cancelled) and
        delete its alive key in the background, unless a newer registration wrote it."""
        host_id = session.host_id
        session.abandon()
        if self.sessions.get(host_id) is not session:
            return  # replaced by a newer session of the same host
        del self.sessions[host_id]
        self.telemetry.sessions_closed.inc()
        self._by_beat.pop(host_id, None)
        self.departed[host_id] = time.monotonic()
        self._retune()
        self._notify(host_id)
        if session.alive_revision:
            task = asyncio.create_task(self._clear_alive(host_id, session.alive_revision),
                                       name=f"clear-alive-{host_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _clear_alive(self, host_id: str, revision: int) -> None:
        try:
            await self.store.clear_alive(host_id, revision)
        except EtcdError as error:
            log.warning("could not delete the alive key of host %s: %s", host_id, error)

    async def _write(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await session.outbound.get()
            if self.sessions.get(session.host_id) is not session or session.revoked:
                return
            if message.WhichOneof("message") is None:
                continue
            await context.write(message)

    async def _read(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        # Status writes run beside the reading, a bounded number at a time (per VM in order:
        # apply_status takes the VM's lock first), so that heartbeats and replies never
        # queue behind etcd, nor one VM's write behind another's.
        writes = asyncio.Semaphore(STATUS_WRITES_PER_HOST)
        reader = asyncio.current_task()
        assert reader is not None

        def written(task: asyncio.Task[None]) -> None:
            writes.release()
            self._report_tasks.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                # A lost report would leave the record stale until the VM next changes:
                # end the stream instead; the agent reconnects and reports every VM again.
                log.warning("recording a status of host %s failed (%s); ending its stream",
                            session.host_id, exc)
                reader.cancel()

        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            if undecodable(message):
                log.warning("host %s sent an undecodable message; closing its stream",
                            session.host_id)
                return
            kind = message.WhichOneof("message")
            if kind == "heartbeat":
                self._heartbeat(session, message.heartbeat)
            elif kind == "vm_status":
                await writes.acquire()
                task = asyncio.create_task(self.apply_status(session, message.vm_status))
                self._report_tasks.add(task)
                task.add_done_callback(written)
            elif kind == "reply":
                session.deliver(message.reply)

    def _heartbeat(self, session: AgentSession, beat: agent_pb2.Heartbeat) -> None:
        """In memory only; the fleet hears of it only when the host's health changes."""
        health = beat.health or host_pb2.HOST_HEALTH_READY
        now = time.time()
        # Past the timeout counts even before the sweep marked it: others read health_of().
        was_silent = session.silent or now - session.last_heartbeat > self.heartbeat_timeout
        transition = health != session.health or was_silent
        session.last_heartbeat = now
        session.health = health
        session.health_detail = beat.health_detail
        session.metrics = beat.metrics
        session.silent = False
        for status in beat.vms:
            session.vm_metrics[status.vm_id] = status.metrics
        if self.sessions.get(session.host_id) is session:
            self._by_beat.move_to_end(session.host_id)
            if transition:
                self._notify(session.host_id)

    # ---- observed state, up ---------------------------------------------------------

    async def apply_status(self, session: AgentSession, status: agent_pb2.VmStatus) -> None:
        """Record what an agent reports about one of its VMs."""
        if status.removed:
            session.vm_metrics.pop(status.vm_id, None)
        elif status.HasField("metrics"):
            session.vm_metrics[status.vm_id] = status.metrics
        lock = self._status_locks.setdefault(status.vm_id, asyncio.Lock())
        async with lock:
            cached = self.cache.get(status.vm_id)
            if cached is None or cached.record.host_id != session.host_id:
                return  # not ours (any more): the desired set makes the agent remove it
            if status.removed:
                if cached.record.deleting:
                    await self.store.delete_vm(status.vm_id)
                    self.telemetry.vm_deleted(cached.record)
                    # Anyone still waiting on this lock finds the VM gone and returns.
                    self._status_locks.pop(status.vm_id, None)
                return
            new = durable_status(status)
            if same_status(cached.record, new):
                return  # nothing new (a re-registering agent reports all its VMs)

            def change(record: records_pb2.VmRecord) -> bool:
                if record.host_id != session.host_id or same_status(record, new):
                    return False
                record.status.CopyFrom(new)
                return True

            # Those waiting for the report (an RPC's answer) need not wait for its write, and
            # the state it reports counts from now, as the cache shows it from now.
            self.cache.note_report(status.vm_id, new)
            if cached.record.status.state != new.state:
                self.telemetry.vm_state_changed(cached.record.status.state, new.state)
            failpoints.hit("controller.status.noted", status.vm_id)
            # A created VM's report, before its boot: the boot may well take it along.
            boot_likely = new.state == vm_pb2.VM_STATE_CREATED \
                and cached.record.desired_state == vm_pb2.VM_STATE_CREATED \
                and new.observed_generation == cached.record.generation
            try:
                stored = await self.status_writes.write(session.host_id, status.vm_id, change,
                                                        known=cached, linger=boot_likely)
                failpoints.hit("controller.status.applied", status.vm_id)
                if stored is not None:
                    self.cache.note_write(stored)
            finally:
                self.cache.report_recorded(status.vm_id)

    def host_of(self, host_id: str) -> AgentSession | None:
        return self.sessions.get(host_id)
