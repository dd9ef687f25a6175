"""Named failpoints: places where the agent or the controller can be made to crash or stall
on purpose, so that tests can prove every step is crash-consistent.

Each point sits right after one step that writes state or talks to a hypervisor. They are
armed through one environment variable, read once at start-up:

    VMM_FAILPOINTS="agent.vm.created=exit;controller.vm.mutated@vm-7=sleep(2)"

A point armed as `name@key` fires only for that key: the VM id, for every point here, so
that one process can carry a different crash for each of several VMs.

Actions: `exit` ends the process at once (no cleanup runs, as with SIGKILL), `panic`
prints the stack first and then exits the same way, `sleep(<seconds>)` stalls the whole
process (heartbeats included) for that long, `off` disarms. Unset, `hit` is a single dict lookup
that finds nothing.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback

ENV = "VMM_FAILPOINTS"
# Exit status of a process ended by a failpoint, so a test can tell it from a real crash.
EXIT_STATUS = 87

# ---- every failpoint, by component --------------------------------------------------------

AGENT_POINTS: dict[str, str] = {
    "agent.desired.saved": "desired.json written, nothing done for it yet",
    "agent.process.spawned": "a hypervisor process started, before runtime.json records it",
    "agent.runtime.recorded": "runtime.json written (a spawn, a boot or a stop recorded)",
    "agent.vm.created": "the hypervisor configured (CREATED), its phase not yet recorded",
    "agent.vm.booted": "the guest started, its phase not yet recorded",
    "agent.vm.stopped": "the guest stopped, its phase not yet recorded",
    "agent.vm.rebooted": "the guest restarted, its phase not yet recorded",
    "agent.vm.hotplugged": "a device or size changed in the hypervisor, desired.json not yet",
    "agent.vm.destroyed": "the hypervisor stopped for good, the VM dir still there",
    "agent.vm.removed": "the VM dir removed, the removal not yet reported",
    "agent.status.saved": "status.json written, the status not yet reported",
}

CONTROLLER_POINTS: dict[str, str] = {
    "controller.create.committed": "a new VM and its allocation committed, no answer yet",
    "controller.vm.mutated": "a VM record's change committed, nothing sent yet",
    "controller.desired.pushed": "a desired state queued to the host's agent",
    "controller.status.noted": "an agent's report shown by this replica, not yet written",
    "controller.status.applied": "an agent's report written to the VM record",
    "controller.vm.deleted": "a VM record deleted and its allocation released",
}

POINTS: dict[str, str] = {**AGENT_POINTS, **CONTROLLER_POINTS}

_ACTION = re.compile(r"^(off|exit|panic|sleep\((\d+(?:\.\d+)?)\))$")


class FailpointError(ValueError):
    """VMM_FAILPOINTS names an unknown failpoint or action."""


def parse(spec: str) -> dict[str, str]:
    """`name[@key]=action;...` as {"name[@key]": action}, every name and action checked."""
    armed: dict[str, str] = {}
    for item in re.split(r"[;,]", spec):
        if not item.strip():
            continue
        target, _, action = item.partition("=")
        target, action = target.strip(), action.strip()
        name = target.partition("@")[0]
        if name not in POINTS:
            raise FailpointError(f"{ENV}: unknown failpoint {name!r}")
        if not _ACTION.match(action):
            raise FailpointError(f"{ENV}: {name}: unknown action {action!r} "
                                 "(off, exit, panic or sleep(<seconds>))")
        if action != "off":
            armed[target] = action
    return armed


_armed: dict[str, str] = parse(os.environ.get(ENV, ""))


def arm(spec: str) -> None:
    """Replace the armed set (for in-process tests; processes read the environment)."""
    global _armed
    _armed = parse(spec)


def hit(name: str, key: str) -> None:
    """Carry out the action armed at `name`, or at `name@key`, if any."""
    if not _armed:
        return
    action = _armed.get(name) or _armed.get(f"{name}@{key}")
    if action is None:
        return
    name = f"{name}@{key}"
    if action == "exit":
        sys.stderr.write(f"failpoint {name}: exit\n")
        sys.stderr.flush()
        os._exit(EXIT_STATUS)
    if action == "panic":
        sys.stderr.write(f"failpoint {name}: panic\n{''.join(traceback.format_stack())}")
        sys.stderr.flush()
        os._exit(EXIT_STATUS)
    match = _ACTION.match(action)
    if match and match.group(2):
        time.sleep(float(match.group(2)))
