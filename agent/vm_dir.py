"""The per-VM state directory: everything a restarted agent needs to adopt a VM.

<state_dir>/vms/<vm_id>/
    desired.json   the last desired state the controller sent (DesiredVm as JSON)
    status.json    the last status the agent reported (VmStatus as JSON)
    runtime.json   what the runtime recorded: pid, process start time, backend, extras
    phase          the lifecycle step under way or last finished, and its generation
                   ("booting 4"), written before and after each step: what lets a
                   restarted agent prove how far an interrupted operation got
    (api socket)   the hypervisor's API socket (QMP for QEMU) lives in <state_dir>/sockets/,
                   named by a digest of the VM id, to stay within the Unix socket path limit
    console.log    the guest's serial console (the hypervisor's stdout), nothing else; a
                   link to the config's console.output when it names one
    console.boot   the size console.log had when the guest last booted
    exit.status    "PID STATUS" of the hypervisor once it ended, from its waiter process
    jail.json      the hypervisor's uid, gid and cgroup, and the host files handed to it
    metrics.json   hypervisor metrics output, where the backend writes a file
    hypervisor.log the hypervisor's own log and its stderr (.1: the previous process's,
                   for backends that start it afresh)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from agent.atomic_file import overwrite_record, replace_text
from vmm.agent.v1 import agent_pb2

# Steps of the lifecycle, as recorded in the phase file: under way -> finished.
STEPS = {"creating": "created", "booting": "running", "stopping": "stopped",
         "rebooting": "running", "pausing": "paused", "resuming": "running",
         "hotplugging": "hotplugged"}
# A phase record's width, newline excluded: the longest step and a 64-bit generation fit.
PHASE_WIDTH = 39
# A console offset record's width, newline excluded: any 64-bit size fits.
OFFSET_WIDTH = 20


@dataclass(frozen=True)
class Phase:
    step: str
    generation: int

    @property
    def under_way(self) -> bool:
        """The step began and was never recorded as finished (the agent died during it)."""
        return self.step in STEPS


@dataclass(frozen=True)
class VmDir:
    path: Path

    @property
    def vm_id(self) -> str:
        return self.path.name

    @property
    def api_socket(self) -> Path:
        # Unix socket paths are limited to 107 bytes, and a VM dir under a deep state dir
        # with a 63-character id can exceed that: sockets live in a short sibling dir.
        digest = hashlib.sha256(self.vm_id.encode()).hexdigest()[:16]
        return self.path.parent.parent / "sockets" / f"{digest}.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def hypervisor_log(self) -> Path:
        return self.path / "hypervisor.log"

    @property
    def exit_status_file(self) -> Path:
        return self.path / "exit.status"

    @property
    def console_boot_file(self) -> Path:
        return self.path / "console.boot"

    @property
    def desired_file(self) -> Path:
        return self.path / "desired.json"

    @property
    def runtime_file(self) -> Path:
        return self.path / "runtime.json"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def phase_file(self) -> Path:
        return self.path / "phase"

    @property
    def jail_file(self) -> Path:
        return self.path / "jail.json"

    def link_console_output(self, output: str) -> None:
        """Send the console to output (a path the host path policy allowed) as well:
        console.log becomes a link to it, so the relay and the tail read the same file."""
        log = self.console_log
        if not output:
            if log.is_symlink():
                log.unlink()
            return
        if log.is_symlink() and os.readlink(log) == output:
            return
        self.create()
        tmp = log.with_suffix(".link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(output)
        os.replace(tmp, log)

    def create(self) -> None:
        """Make the VM's directory, and the sockets directory when this makes the VM's.
        Called before every write: one mkdir when it is there already."""
        try:
            os.mkdir(self.path)
        except FileExistsError:
            return
        except FileNotFoundError:
            self.path.mkdir(parents=True, exist_ok=True)
        self.api_socket.parent.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.path.is_dir()

    def remove(self) -> None:
        self.api_socket.unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def save_desired(self, desired: agent_pb2.DesiredVm) -> None:
        self.create()
        replace_text(self.desired_file, _compact_json(desired))

    def load_desired(self) -> agent_pb2.DesiredVm | None:
        try:
            return json_format.Parse(self.desired_file.read_text(), agent_pb2.DesiredVm())
        except (OSError, json_format.ParseError):
            return None

    def save_status(self, status: agent_pb2.VmStatus) -> None:
        self.create()
        kept = agent_pb2.VmStatus()
        kept.CopyFrom(status)
        kept.ClearField("metrics")
        replace_text(self.status_file, _compact_json(kept))

    def load_status(self) -> agent_pb2.VmStatus | None:
        try:
            return json_format.Parse(self.status_file.read_text(), agent_pb2.VmStatus())
        except (OSError, json_format.ParseError):
            return None

    def save_phase(self, step: str, generation: int) -> None:
        """One small atomic write per step: the step name and the generation it serves,
        padded to one width so that each record overwrites the last in place."""
        overwrite_record(self.phase_file, f"{step} {generation}".ljust(PHASE_WIDTH) + "\n")

    def load_phase(self) -> Phase | None:
        try:
            step, generation = self.phase_file.read_text().split()
            return Phase(step, int(generation))
        except (OSError, ValueError):
            return None

    def save_runtime(self, data: dict[str, Any]) -> None:
        self.create()
        replace_text(self.runtime_file, json.dumps(data, sort_keys=True))

    def load_runtime(self) -> dict[str, Any]:
        try:
            data = json.loads(self.runtime_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_console_boot_offset(self, offset: int) -> None:
        self.create()
        # A fixed width, as the phase: written over the last offset in place.
        overwrite_record(self.console_boot_file, str(offset).ljust(OFFSET_WIDTH) + "\n")

    def load_console_boot_offset(self) -> int:
        """Where the guest's last boot began in console.log (0 when never recorded)."""
        try:
            return int(self.console_boot_file.read_text())
        except (OSError, ValueError):
            return 0

    def clear_runtime(self) -> None:
        self.runtime_file.unlink(missing_ok=True)


def _compact_json(message: Message) -> str:
    """One line of JSON (`jq .` shows it indented): json encodes indented output in Python,
    a few times slower than its one-line encoder, on every step of every VM."""
    return json_format.MessageToJson(message, indent=None)


# sockaddr_un's sun_path is 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


class StateDir:
    """The agent's root state directory."""

    def __init__(self, root: Path) -> None:
        longest = len(str(VmDir(root / "vms" / "x").api_socket))
        if longest > MAX_SOCKET_PATH:
            raise ValueError(f"state dir {root} is too long: its API socket paths would be "
                             f"{longest} bytes, over the {MAX_SOCKET_PATH} a Unix socket allows")
        self.root = root
        self.vms_root = root / "vms"
        self.vms_root.mkdir(parents=True, exist_ok=True)
        self.sockets_dir = VmDir(self.vms_root / "x").api_socket.parent
        self.sockets_dir.mkdir(exist_ok=True)

    def vm(self, vm_id: str) -> VmDir:
        return VmDir(self.vms_root / vm_id)

    def existing(self) -> list[VmDir]:
        return [VmDir(p) for p in sorted(self.vms_root.iterdir()) if p.is_dir()]
