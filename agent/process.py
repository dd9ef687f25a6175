"""Hypervisor process supervision: spawn detached, find again after a restart, stop.

Hypervisors run in their own session so that an agent crash (even kill -9)
leaves them running; a restarted agent identifies them by pid *and* process
start time, so a recycled pid is never mistaken for the VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent import cgroups
from agent.jail import Confinement
from vmm.common import failpoints


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    # psutil's create_time(): seconds since the epoch, as a float.
    started_at: float
    # Where the process's waiter writes its exit status (see agent.waiter); "" for none.
    exit_file: str = ""

    def to_dict(self) -> dict[str, float | int | str]:
        data: dict[str, float | int | str] = {"pid": self.pid, "started_at": self.started_at}
        if self.exit_file:
            data["exit_file"] = self.exit_file
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ProcessRef | None:
        pid, started = data.get("pid"), data.get("started_at")
        if not isinstance(pid, int) or not isinstance(started, int | float):
            return None
        exit_file = data.get("exit_file")
        return cls(pid, float(started), exit_file if isinstance(exit_file, str) else "")


WAITER = str(Path(__file__).with_name("waiter.py"))
# Isolated, without site packages: the waiter imports nothing of the agent.
WAITER_COMMAND = (sys.executable, "-I", "-S", WAITER)
# Seconds a waiter may take to start its hypervisor.
WAITER_START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Started:
    """A process just started. `confined` settles once it (and its waiter) are in their
    cgroup, which may take a while after the process itself is up; see start()."""

    ref: ProcessRef
    confined: asyncio.Future[None]


async def spawn(argv: Sequence[str], console_log: Path, cwd: Path | None = None,
                env: dict[str, str] | None = None, hypervisor_log: Path | None = None,
                exit_file: Path | None = None,
                confinement: Confinement | None = None) -> ProcessRef:
    """Start argv detached from the agent, stdout appended to console_log (where a
    hypervisor writes its guest's serial port) and stderr to hypervisor_log (its own
    messages; console_log too when None). With exit_file, argv runs under a waiter
    (agent.waiter) that writes its exit status there, whoever adopts it meanwhile.
    A confinement runs argv as its uid and puts it (and its waiter) in its cgroup before
    this returns."""
    started = await start(argv, console_log, cwd, env, hypervisor_log, exit_file, confinement)
    await started.confined
    return started.ref


async def start(argv: Sequence[str], console_log: Path, cwd: Path | None = None,
                env: dict[str, str] | None = None, hypervisor_log: Path | None = None,
                exit_file: Path | None = None,
                confinement: Confinement | None = None) -> Started:
    """What spawn() does, returning as soon as the process is known.

    Under a waiter on cgroup v1 the waiter joins the cgroup itself before it starts argv,
    which is then born there. Otherwise the agent moves the process by pid, and the first
    such move after a quiet spell waits for an RCU grace period (12 ms and more here): this
    returns while the move is under way, time the process can spend starting up. The caller
    awaits `confined` before the process runs anything of the guest's."""
    joins = _self_joins(exit_file, confinement)
    proc = _launch(argv, console_log, cwd, env, hypervisor_log, exit_file, confinement, joins)
    by_agent = bool(confinement and confinement.cgroup_procs) and not joins
    moving: asyncio.Future[None]
    if by_agent:
        # So that what it starts starts there. In a thread: the agent's other VMs and
        # heartbeats must not wait for the grace period either.
        moving = asyncio.ensure_future(
            asyncio.to_thread(_enter_cgroup, proc, proc.pid, confinement))
    else:
        moving = asyncio.get_running_loop().create_future()
        moving.set_result(None)
    # A caller that fails before awaiting it (its process is being killed) leaves it be.
    moving.add_done_callback(_retrieve)
    if exit_file is None:
        return Started(ProcessRef(proc.pid, psutil.Process(proc.pid).create_time()), moving)
    child = await _waiters_child(proc)
    ref = ProcessRef(child.pid, child.create_time(), str(exit_file))
    start_standby_soon()  # for the next VM, now that this one's process is up
    if not by_agent:
        return Started(ref, moving)

    async def confine_child() -> None:
        await moving
        # Had the waiter forked before it moved; the move is quick now.
        _enter_cgroup(proc, child.pid, confinement)

    confined = asyncio.ensure_future(confine_child())
    confined.add_done_callback(_retrieve)
    return Started(ref, confined)


def _self_joins(exit_file: Path | None, confinement: Confinement | None) -> list[Path]:
    """The cgroup files the waiter writes itself into, or none when the agent moves it."""
    if exit_file is None or confinement is None or not confinement.cgroup_procs:
        return []
    return cgroups.self_join_files([Path(p) for p in confinement.cgroup_procs]) or []


def _retrieve(future: asyncio.Future[None]) -> None:
    """Consume the outcome of a move, so that one nobody awaited is not reported as lost."""
    if not future.cancelled():
        future.exception()


def _launch(argv: Sequence[str], console_log: Path, cwd: Path | None,
            env: dict[str, str] | None, hypervisor_log: Path | None, exit_file: Path | None,
            confinement: Confinement | None, joins: Sequence[Path] = ()
            ) -> subprocess.Popen[bytes]:
    """The process spawn() starts: argv itself, or its waiter (joining the cgroup files
    `joins` first), the standby one when there is one."""
    console_log.parent.mkdir(parents=True, exist_ok=True)
    command = list(argv)
    if confinement is not None:
        command = [*confinement.drop_privileges(), *command]
    proc = None
    if exit_file is not None:
        exit_file.unlink(missing_ok=True)
        command = [*(arg for path in joins for arg in ("--join", str(path))),
                   str(exit_file), *command]
        proc = _hand_to_standby(command, console_log, cwd, env, hypervisor_log)
        if proc is None:
            command = [*WAITER_COMMAND, *command]
    if proc is None:
        with open(console_log, "ab", buffering=0) as out, \
                open(hypervisor_log or os.devnull, "ab", buffering=0) as err:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err if hypervisor_log else subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        _reap_in_background(proc)
    failpoints.hit("agent.process.spawned", console_log.parent.name)
    return proc


# A waiter started ahead of need, idle until it is handed a process to start (see
# agent.waiter): a create then does not wait for an interpreter to start.
_standby: subprocess.Popen[bytes] | None = None
_standby_lock = threading.Lock()
_standby_starting = False  # one thread at a time starts it, however many VMs start at once


def start_standby_soon() -> None:
    """Have a standby waiter ready, started in a thread: forking the agent takes a
    millisecond or two that the event loop does not wait for."""
    global _standby_starting
    with _standby_lock:
        if _standby_starting or (_standby is not None and _standby.poll() is None):
            return
        _standby_starting = True
    threading.Thread(target=_start_standby, daemon=True, name="standby-waiter").start()


def _start_standby() -> None:
    global _standby, _standby_starting
    proc = None
    try:
        # Its stdout and stderr until it is handed work: the agent's own log, where a
        # broken request would show. Its working directory pins nothing.
        proc = subprocess.Popen([*WAITER_COMMAND, "--standby"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, cwd="/", start_new_session=True,
                                close_fds=True)
        _reap_in_background(proc)
    finally:
        with _standby_lock:
            _standby_starting = False
            if proc is not None:
                _standby = proc


def _hand_to_standby(waiter_args: Sequence[str], console_log: Path, cwd: Path | None,
                     env: dict[str, str] | None, hypervisor_log: Path | None
                     ) -> subprocess.Popen[bytes] | None:
    """The standby waiter, now starting waiter_args; None when there is none (to start one
    afresh instead)."""
    global _standby
    with _standby_lock:
        proc, _standby = _standby, None
    if proc is None or proc.stdin is None or proc.poll() is not None:
        return None
    request = {"args": list(waiter_args), "stdout": str(console_log), "cwd": cwd and str(cwd),
               "stderr": hypervisor_log and str(hypervisor_log), "env": env}
    try:
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.close()
    except OSError:  # it died just now
        proc.kill()
        return None
    return proc


def stop_standby() -> None:
    """End the standby waiter, if any (it ends by itself once the agent is gone)."""
    global _standby
    with _standby_lock:
        proc, _standby = _standby, None
    if proc is not None:
        _end(proc)


def _end(standby: subprocess.Popen[bytes]) -> None:
    standby.kill()
    standby.wait()
    if standby.stdin is not None:
        standby.stdin.close()


def _enter_cgroup(proc: subprocess.Popen[bytes], pid: int,
                  confinement: Confinement | None) -> None:
    if confinement is None or not confinement.cgroup_procs:
        return
    try:
        confinement.enter_cgroup(pid)
    except OSError:
        proc.kill()
        raise


async def _waiters_child(waiter: subprocess.Popen[bytes]) -> psutil.Process:
    """The hypervisor a waiter has started: its only child. Polled without blocking the
    event loop: the waiter's interpreter takes some milliseconds to start."""
    deadline = time.monotonic() + WAITER_START_TIMEOUT
    while time.monotonic() < deadline:
        children = _children_of(waiter.pid)
        if children:
            try:
                return psutil.Process(children[0])
            except psutil.Error:
                pass
        if waiter.poll() is not None:
            raise RuntimeError(f"the waiter of {WAITER} exited with status {waiter.returncode} "
                               "before starting its process")
        await asyncio.sleep(0.001)
    raise TimeoutError(f"the waiter did not start its process within {WAITER_START_TIMEOUT}s")


def _children_of(pid: int) -> list[int]:
    """The pids of a process's children: one small read where the kernel lists them
    (/proc/PID/task/PID/children), else a scan of every process on the host."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        pass
    except OSError:
        return []
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


# Children this agent spawned, and the exit statuses of those it has reaped, by pid.
_children: set[int] = set()
_exit_statuses: dict[int, int] = {}


def _reap_in_background(proc: subprocess.Popen[bytes]) -> None:
    # The agent is the parent while it lives: reap the child so it never lingers
    # as a zombie that still looks alive to is_alive(), and keep its exit status.
    _children.add(proc.pid)

    def reap() -> None:
        _exit_statuses[proc.pid] = proc.wait()

    threading.Thread(target=reap, daemon=True, name=f"reap-{proc.pid}").start()


# Processes proven to be theirs (pid and start time), each with a pidfd: it stays bound to
# that very process, so later checks cost one poll instead of two reads of /proc, and a
# recycled pid cannot fool them.
_pidfds: dict[tuple[int, float], int] = {}


def is_alive(ref: ProcessRef) -> bool:
    fd = _pidfds.get((ref.pid, ref.started_at))
    if fd is not None:
        if not _exited(fd):
            return True
        _forget(ref)
        return False
    if not _matches(ref):
        return False
    _watch(ref)
    return True


def _matches(ref: ProcessRef) -> bool:
    """Whether the process with ref's pid is ref's process (by start time), not a zombie."""
    try:
        p = psutil.Process(ref.pid)
        if abs(p.create_time() - ref.started_at) > 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(ref: ProcessRef) -> None:
    """Keep a pidfd of ref's process, where the kernel offers pidfds (Linux 5.3)."""
    try:
        fd = os.pidfd_open(ref.pid)
    except (AttributeError, OSError):
        return
    # The pid may have changed hands between the check and the open: check again, now
    # that the pidfd holds whichever process it is.
    if _exited(fd) or not _matches(ref):
        os.close(fd)
        return
    _pidfds[(ref.pid, ref.started_at)] = fd


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has ended (a zombie included)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _forget(ref: ProcessRef) -> None:
    fd = _pidfds.pop((ref.pid, ref.started_at), None)
    if fd is not None:
        os.close(fd)


def exit_status(ref: ProcessRef) -> int | None:
    """The exit status of an ended process (negative: killed by that signal), from its
    waiter's record or, for a child of this agent, the agent's own; None when neither
    can tell (a process without a waiter adopted after an agent restart)."""
    if ref.exit_file:
        return _recorded_exit_status(ref)
    if ref.pid not in _children:
        return None
    # The process turns into a zombie a moment before the reaper thread records it.
    deadline = time.monotonic() + 1.0
    while ref.pid not in _exit_statuses and time.monotonic() < deadline:
        time.sleep(0.002)
    return _exit_statuses.get(ref.pid)


def _recorded_exit_status(ref: ProcessRef) -> int | None:
    # The waiter writes the file a moment after its child has ended.
    deadline = time.monotonic() + 1.0
    while True:
        try:
            pid, status = Path(ref.exit_file).read_text().split()
            if int(pid) == ref.pid:
                return int(status)
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def exit_detail(ref: ProcessRef) -> str:
    """How the process ended, as far as the agent can still tell."""
    status = exit_status(ref)
    if status is None:
        # Adopted after an agent restart: not our child, so no exit status.
        return f"hypervisor process {ref.pid} exited"
    if status < 0:
        return f"hypervisor process {ref.pid} was killed by {signal.Signals(-status).name}"
    return f"hypervisor process {ref.pid} exited with status {status}"


async def wait_exit(ref: ProcessRef, timeout: float) -> bool:
    """Wait up to timeout seconds for the process to end; True if it did."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if not is_alive(ref):
            return True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return not is_alive(ref)


async def terminate(ref: ProcessRef, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after grace seconds; returns once the process is gone."""
    if not is_alive(ref):
        return
    _signal(ref.pid, signal.SIGTERM)
    if await wait_exit(ref, grace):
        return
    await kill(ref)


async def kill(ref: ProcessRef) -> None:
    if not is_alive(ref):
        return
    _signal(ref.pid, signal.SIGKILL)
    await wait_exit(ref, 5.0)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cpu_seconds(ref: ProcessRef) -> float:
    try:
        t = psutil.Process(ref.pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def rss_bytes(ref: ProcessRef) -> int:
    try:
        return int(psutil.Process(ref.pid).memory_info().rss)
    except psutil.Error:
        return 0


async def wait_for_socket(path: Path, ref: ProcessRef, timeout: float) -> None:
    """Wait until the hypervisor has created its API socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():  # noqa: ASYNC240 - a stat of a local path does not block
            return
        if not is_alive(ref):
            raise RuntimeError(f"{exit_detail(ref)} before creating its API socket {path}")
        await asyncio.sleep(0.002)
    raise TimeoutError(f"hypervisor did not create its API socket {path} within {timeout}s")


def find_by_argument(needles: set[str]) -> list[ProcessRef]:
    """Live processes one of whose arguments contains one of needles (a VM's API socket
    path, say): one pass over the process table, for recovery, never on a request path."""
    found: list[ProcessRef] = []
    if not needles:
        return found
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = p.info.get("cmdline") or []
        started = p.info.get("create_time")
        if p.pid != os.getpid() and started is not None \
                and any(n in arg for arg in cmdline for n in needles):
            found.append(ProcessRef(p.pid, started))
    return found
