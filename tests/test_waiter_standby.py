"""The standby waiter: started ahead of need, it starts the next hypervisor process with
exactly what a freshly started waiter gives it (streams, working directory, environment,
exit record), and it never outlives its agent."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import psutil
import pytest

from agent import process
from agent.process import WAITER_COMMAND, ProcessRef
from tools.fleet.cluster import wait_until

# Writes to both streams, then waits for a "go" file in its working directory.
SCRIPT = ("import os, sys, time; print('out', os.getcwd(), os.environ.get('STANDBY_TEST'),"
          " flush=True); print('err', file=sys.stderr, flush=True)\n"
          "while not os.path.exists('go'): time.sleep(0.01)\n"
          "sys.exit(7)")


@pytest.fixture(autouse=True)
def no_standby_around() -> Iterator[None]:
    process.stop_standby()
    yield
    process.stop_standby()


async def start_script(work: Path) -> ProcessRef:
    work.mkdir()  # noqa: ASYNC240 - the test's own directory, before anything runs
    env = {**os.environ, "STANDBY_TEST": work.name}
    started = await process.start([sys.executable, "-c", SCRIPT], work / "console.log",
                                  cwd=work, env=env, hypervisor_log=work / "hypervisor.log",
                                  exit_file=work / "exit")
    await started.confined
    return started.ref


def standby() -> subprocess.Popen[bytes]:
    """The standby waiter, once the thread that starts it has."""
    wait_until(lambda: process._standby is not None, timeout=10, what="a standby waiter")
    assert process._standby is not None
    return process._standby


def waiter_of(ref: ProcessRef) -> psutil.Process:
    return psutil.Process(psutil.Process(ref.pid).ppid())


def wrote(work: Path) -> bool:
    return (work / "hypervisor.log").stat().st_size > 0


def finish(work: Path) -> None:
    (work / "go").touch()
    wait_until(lambda: (work / "exit").exists(), timeout=10, what=f"{work.name}'s exit record")


def test_the_next_process_starts_under_the_standby_with_what_a_fresh_waiter_gives(
        tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"

    async def both() -> tuple[psutil.Process, psutil.Process, int | None]:
        first_waiter = waiter_of(await start_script(first))
        first_standby = standby()  # started once the first process was up
        second_waiter = waiter_of(await start_script(second))
        assert standby().pid != first_standby.pid
        return first_waiter, second_waiter, first_standby.pid

    first_waiter, second_waiter, standby_pid = asyncio.run(both())
    assert "--standby" not in first_waiter.cmdline()  # none was waiting yet
    assert second_waiter.pid == standby_pid
    assert second_waiter.cmdline() == [*WAITER_COMMAND, "--standby"]
    for work in (first, second):
        wait_until(partial(wrote, work), timeout=10, what=f"{work.name} to write")
        assert (work / "console.log").read_text() == f"out {work} {work.name}\n"
        assert (work / "hypervisor.log").read_text() == "err\n"
        finish(work)
        pid, status = (work / "exit").read_text().split()
        assert status == "7"
    assert int(pid) != second_waiter.pid  # the record names the process, not its waiter


def test_a_dead_standby_is_passed_over_for_a_fresh_waiter(tmp_path: Path) -> None:
    async def run() -> psutil.Process:
        finish_later = tmp_path / "first"
        await start_script(finish_later)
        finish(finish_later)
        dead = standby()
        dead.kill()
        dead.wait()
        return waiter_of(await start_script(tmp_path / "second"))

    waiter = asyncio.run(run())
    assert "--standby" not in waiter.cmdline()
    finish(tmp_path / "second")
    assert (tmp_path / "second" / "exit").read_text().split()[1] == "7"


def test_a_standby_whose_agent_is_gone_exits_and_starts_nothing(tmp_path: Path) -> None:
    standby = subprocess.Popen([*WAITER_COMMAND, "--standby"], stdin=subprocess.PIPE,
                               cwd=tmp_path, start_new_session=True)
    assert standby.stdin is not None
    standby.stdin.close()  # what the agent's end does to the pipe
    assert standby.wait(timeout=10) == 0
    assert not list(tmp_path.iterdir())


def test_stopping_the_standby_leaves_no_process(tmp_path: Path) -> None:
    async def run() -> int:
        await start_script(tmp_path / "first")
        finish(tmp_path / "first")
        return standby().pid

    pid = asyncio.run(run())
    process.stop_standby()
    assert not psutil.pid_exists(pid) or \
        psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_many_processes_started_at_once_leave_one_standby(tmp_path: Path) -> None:
    async def run() -> None:
        refs = await asyncio.gather(*(start_script(tmp_path / f"vm-{i}") for i in range(6)))
        assert len({ref.pid for ref in refs}) == 6
        standby()

    asyncio.run(run())
    standing_by = [p for p in psutil.Process().children()
                   if p.cmdline() == [*WAITER_COMMAND, "--standby"] and p.status() != "zombie"]
    assert len(standing_by) == 1
    for i in range(6):
        finish(tmp_path / f"vm-{i}")
