"""A VM's restart policy: whether and when the agent boots a FAILED VM again.

Pure decisions, no I/O: the reconciler keeps the resulting `RestartStatus` in the VM's
status (status.json, so counts survive agent restarts) and carries the restart out.
Like Nomad's restart block: `attempts` restarts per `interval_seconds` window, the
first after `delay_seconds`, each further one `backoff_multiplier` times later, up to
`max_delay_seconds`; once a window's attempts are used up the VM stays FAILED.
"""

from __future__ import annotations

from vmm.v1 import vm_pb2

DEFAULT_MULTIPLIER = 2.0


def restarts_on_failure(policy: vm_pb2.RestartPolicy) -> bool:
    return policy.mode == vm_pb2.RESTART_MODE_ON_FAILURE


def backoff(policy: vm_pb2.RestartPolicy, attempts: int) -> float:
    """Seconds to wait before restart number attempts + 1 of a window."""
    multiplier = policy.backoff_multiplier or DEFAULT_MULTIPLIER
    wait = policy.delay_seconds * multiplier ** attempts
    return min(wait, policy.max_delay_seconds) if policy.max_delay_seconds else wait


def after_failure(policy: vm_pb2.RestartPolicy, previous: vm_pb2.RestartStatus,
                  now: float) -> vm_pb2.RestartStatus:
    """The restart status of a VM that has just failed at `now`."""
    status = vm_pb2.RestartStatus()
    status.CopyFrom(previous)
    status.next_restart_timestamp = 0
    status.backoff_seconds = 0
    window_over = policy.interval_seconds and \
        now - status.window_start_timestamp >= policy.interval_seconds
    if not status.window_start_timestamp or window_over:
        status.attempts = 0
        status.window_start_timestamp = int(now)
        status.exhausted = False
    if policy.attempts and status.attempts >= policy.attempts:
        status.exhausted = True
        return status
    status.backoff_seconds = backoff(policy, status.attempts)
    # Rounded up: the restart never comes before the backoff is over.
    status.next_restart_timestamp = int(-(-(now + status.backoff_seconds) // 1))
    return status


def describe(policy: vm_pb2.RestartPolicy, status: vm_pb2.RestartStatus) -> str:
    """What a FAILED VM's reason says of its restarts."""
    if status.exhausted:
        window = f" within {policy.interval_seconds}s" if policy.interval_seconds else ""
        return f"restart policy: {status.attempts} restarts{window} used up; the VM stays FAILED"
    return (f"restart policy: restart {status.attempts + 1} in {status.backoff_seconds:g}s")
