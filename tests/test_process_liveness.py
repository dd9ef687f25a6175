"""Liveness of hypervisor processes: by pid and start time, then by a pidfd held on the
process once it is proven, so that a recycled pid never passes for the VM's process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from agent import process
from agent.process import ProcessRef

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"),
                                reason="this kernel or Python has no pidfd_open")


def started(proc: subprocess.Popen[bytes]) -> ProcessRef:
    return ProcessRef(proc.pid, psutil.Process(proc.pid).create_time())


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_process_is_alive_and_its_end_is_seen(sleeper: subprocess.Popen[bytes]) -> None:
    ref = started(sleeper)
    fds = open_fds()
    assert process.is_alive(ref)
    assert len(open_fds() - fds) == 1  # the pidfd now held on it
    assert process.is_alive(ref)

    sleeper.kill()
    sleeper.wait()
    assert not process.is_alive(ref)
    assert open_fds() <= fds  # the pidfd is closed with the process


def test_a_zombie_is_not_alive(sleeper: subprocess.Popen[bytes]) -> None:
    ref = started(sleeper)
    assert process.is_alive(ref)
    sleeper.kill()
    # Not reaped yet: the pid still names a zombie, whose pidfd polls readable.
    deadline = time.monotonic() + 10
    while psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the killed process never became a zombie"
        time.sleep(0.001)
    assert not process.is_alive(ref)


def test_another_start_time_is_another_process(sleeper: subprocess.Popen[bytes]) -> None:
    fds = open_fds()
    stale = ProcessRef(sleeper.pid, psutil.Process(sleeper.pid).create_time() - 10)
    assert not process.is_alive(stale)
    assert open_fds() == fds  # nothing kept for a process that is not the one named
    assert process.is_alive(started(sleeper))
