"""firecracker-sim against the real Firecracker v1.14.2.

The core test replays, in order, every request of two exchanges recorded with
the real v1.14.2 binary (kept verbatim at the end of this file) against fresh
simulator processes, and expects the same status line, headers and body. The
recording's scratch folder `$WORK` becomes a temp dir holding the files the
recording had (a tiny ELF kernel without the i8042 driver, a data disk, ...);
the ones it lacked stay missing. Further tests cover what the recordings do not
show: Ctrl+Alt+Del with an i8042 guest, metrics lines, the console, snapshot
load failures, signals and HTTP framing, each as observed on the real binary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Generous bound for things that take milliseconds; never asserted on.
PATIENCE = 10.0
MIB = 1024 * 1024


# ---- a simulator process and a curl-like client -------------------------------------


@dataclass
class HttpResponse:
    status_line: str
    headers: list[str]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def json(self) -> object:
        return json.loads(self.body)


class ResponseReader:
    """Reads responses one by one off a keep-alive connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"connection closed mid-response: {self.buffer!r}"
        self.buffer += chunk

    def next(self) -> HttpResponse:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        while len(rest) < length:
            self._fill()
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[length:]
        return HttpResponse(lines[0], lines[1:], rest[:length])


def request(api: Path, method: str, path: str, body: bytes | None = None,
            headers: tuple[str, ...] = ()) -> HttpResponse:
    """One request on its own connection, with the headers curl sends."""
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "User-Agent: curl/7.88.1",
            "Accept: */*", *headers]
    if body is not None:
        head += [f"Content-Length: {len(body)}"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PATIENCE)
        sock.connect(str(api))
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        return ResponseReader(sock).next()


def call(api: Path, method: str, path: str, body: object = None) -> HttpResponse:
    data = None if body is None else json.dumps(body).encode()
    return request(api, method, path, data, ("Content-Type: application/json",))


@dataclass
class SimProcess:
    api: Path
    console: Path
    proc: subprocess.Popen[bytes]

    def console_text(self) -> str:
        return self.console.read_text()

    def wait(self) -> int:
        return self.proc.wait(timeout=PATIENCE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=PATIENCE)


def start_sim(api: Path, console: Path, *args: str,
              env: dict[str, str] | None = None) -> SimProcess:
    """Start the simulator the way a runtime starts Firecracker; wait for its socket."""
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.simulators.firecracker", "--api-sock", str(api), *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + PATIENCE
    while not api.exists():
        if proc.poll() is not None:
            raise AssertionError(f"simulator exited with {proc.returncode}: "
                                 f"{console.read_text()}")
        assert time.monotonic() < deadline, "simulator did not create its API socket"
        time.sleep(0.005)
    # Like Firecracker, the socket file appears at bind(), a moment before listen().
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(api))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "simulator never accepted connections"
                time.sleep(0.002)
    return SimProcess(api, console, proc)


@pytest.fixture
def sims() -> Iterator[list[SimProcess]]:
    started: list[SimProcess] = []
    yield started
    for sim in started:
        sim.stop()


# ---- guest images -------------------------------------------------------------------


def elf_kernel(extra: bytes = b"") -> bytes:
    """A minimal x86-64 ELF image: one PT_LOAD segment whose code halts in a loop."""
    code = b"\xf4\xeb\xfd" + extra  # hlt; jmp hlt
    entry = 0x1000000
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 120, entry, entry, len(code), len(code), 0x1000)
    return header + segment + code


TINY_KERNEL = elf_kernel()
# Stands for a Linux kernel built with the i8042 keyboard driver.
I8042_KERNEL = elf_kernel(b"\0serio: i8042 KBD port\0")


def write_disk(path: Path, size: int = MIB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- parsing the recorded exchanges --------------------------------------------------

CURL = re.compile(r"^\$ curl (?P<args>.*)$")
CURL_REQUEST = re.compile(
    r"-X (?P<method>[A-Z]+) '(?P<url>[^']*)'(?: -H '(?P<header>[^']*)')?(?: -d '(?P<body>.*)')?$")


@dataclass
class Exchange:
    method: str
    path: str
    header: str | None
    body: str | None
    status_line: str
    headers: list[str]
    response_body: str


@dataclass
class Segment:
    """The requests one recorded Firecracker process answered, and what was noted about it."""

    api: str
    console: str | None
    steps: list[Exchange | str] = field(default_factory=list)


def parse_recording(text: str) -> list[Segment]:
    segments: list[Segment] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("### started"):
            api = re.search(r"--api-sock (\S+)", line)
            console = re.search(r"stdout\+serial -> (\S+?)\)", line)
            assert api, line
            segments.append(Segment(api.group(1), console.group(1) if console else None))
        elif line.startswith("### killed"):
            segments[-1].steps.append("killed")
        elif line.startswith("### "):
            if segments:
                segments[-1].steps.append(line)
        elif (m := CURL.match(line)) is not None:
            req = CURL_REQUEST.search(m.group("args"))
            assert req, line
            status_line = lines[i]
            i += 1
            headers = []
            while lines[i] != "":
                headers.append(lines[i])
                i += 1
            i += 1
            body_lines = []
            while not lines[i].startswith("[curl time_total="):
                body_lines.append(lines[i])
                i += 1
            path = req.group("url").removeprefix("http://localhost")
            segments[-1].steps.append(Exchange(
                req.group("method"), path, req.group("header"), req.group("body"),
                status_line, headers, "\n".join(body_lines).strip("\n")))
    return segments


def test_both_recordings_parse_into_every_request() -> None:
    parts = [parse_recording(PART_1), parse_recording(PART_2)]
    requests = [s for part in parts for seg in part for s in seg.steps
                if isinstance(s, Exchange)]
    # The counts of `$ curl` lines in the two recordings.
    assert len(requests) == PART_1.count("\n$ curl") + PART_2.count("\n$ curl") == 74
    assert [len(part) for part in parts] == [5, 1]


# ---- the replay -----------------------------------------------------------------------


def prepare_work_dir(work: Path) -> None:
    """The files the recording's $WORK held; the paths it lacked stay missing."""
    (work / "tiny").mkdir(parents=True)
    (work / "tiny" / "tiny64.elf").write_bytes(TINY_KERNEL)
    write_disk(work / "disks" / "data.ext4")
    (work / "logs").mkdir()
    (work / "snap").mkdir()
    (work / "kernel").mkdir()
    # Recorded with a distribution kernel that never got far enough to see the keyboard.
    (work / "kernel" / "vmlinux").write_bytes(TINY_KERNEL)
    (work / "kernel" / "initramfs.cpio.gz").write_bytes(b"\x1f\x8b initramfs")


def replay(segments: list[Segment], work: Path, sims: list[SimProcess]) -> int:
    """Replay every segment in order; returns the number of requests checked."""
    checked = 0
    for number, segment in enumerate(segments):
        api = Path(segment.api.replace("$WORK", str(work)))
        # Firecracker leaves its socket behind; the recording removed it before a restart.
        api.unlink(missing_ok=True)
        console = Path(segment.console.replace("$WORK", str(work))) if segment.console \
            else work / f"console-{number}.out"
        sim = start_sim(api, console)
        sims.append(sim)
        for step in segment.steps:
            if step == "killed":
                sim.stop()
            elif isinstance(step, str):
                check_note(step, sim, work)
            else:
                check_exchange(step, sim, work)
                checked += 1
    return checked


def check_exchange(ex: Exchange, sim: SimProcess, work: Path) -> None:
    def here(text: str) -> str:
        return text.replace("$WORK", str(work))

    body = None if ex.body is None else here(ex.body).encode()
    headers = (ex.header,) if ex.header else ()
    got = request(sim.api, ex.method, here(ex.path), body, headers)
    where = f"{ex.method} {ex.path} {ex.body or ''}"
    assert got.status_line == ex.status_line, where
    expected_body = here(ex.response_body).encode()
    assert got.body == expected_body, where
    for header in ex.headers:  # part 2 was recorded without headers
        if header.startswith("Content-Length:"):
            header = f"Content-Length: {len(expected_body)}"
        assert header in got.headers, f"{where}: missing {header!r} in {got.headers}"
    if ex.headers:
        assert len(got.headers) == len(ex.headers), where
    if ex.response_body and not ex.response_body.startswith('{ "error"'):
        # Also JSON-equal (micro_http's own error body is not valid JSON).
        assert got.json() == json.loads(expected_body), where


def check_note(note: str, sim: SimProcess, work: Path) -> None:
    """The recording's own observations that the simulator can reproduce."""
    if note.startswith("### serial output so far: GUEST-READY"):
        assert "GUEST-READY" in sim.console_text()
    elif note.startswith("### snapshot files:"):
        # `ls -la` entries: mode, links, owner, group, size, date (3 fields), name.
        for entry in note.removeprefix("### snapshot files:").split(";"):
            fields = entry.split()
            if len(fields) == 9 and fields[8].startswith("vm."):
                size = (work / "snap" / fields[8]).stat().st_size
                # The memory file is as large as the guest memory; the state is ours.
                assert size == int(fields[4]) if fields[8] == "vm.mem" else size > 0
    elif "process alive=yes" in note:
        assert sim.proc.poll() is None


def test_replay_recorded_exchanges(tmp_path: Path, sims: list[SimProcess]) -> None:
    work = tmp_path / "work"
    prepare_work_dir(work)
    checked = replay(parse_recording(PART_1), work, sims)
    checked += replay(parse_recording(PART_2), work, sims)
    assert checked == 74


# ---- what the recordings do not show --------------------------------------------------


def configure_boot(api: Path, kernel: Path, boot_args: str = "console=ttyS0 reboot=k") -> None:
    assert call(api, "PUT", "/boot-source",
                {"kernel_image_path": str(kernel), "boot_args": boot_args}).status == 204


def test_ctrl_alt_del_reboots_an_i8042_guest_and_firecracker_exits_0(
        tmp_path: Path, sims: list[SimProcess]) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(I8042_KERNEL)
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    configure_boot(api, kernel)
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    response = call(api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert response.status_line == "HTTP/1.1 204 " and response.body == b""
    assert sim.wait() == 0
    console = sim.console_text()
    assert console.index("GUEST-READY") < console.index("reboot: Restarting system")
    assert "Firecracker exiting successfully. exit_code=0" in console
    assert api.exists(), "Firecracker leaves its API socket behind"


def test_paused_i8042_guest_reboots_only_once_resumed(
        tmp_path: Path, sims: list[SimProcess]) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(I8042_KERNEL)
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    configure_boot(api, kernel)
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    assert call(api, "PATCH", "/vm", {"state": "Paused"}).status == 204
    assert call(api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}).status == 204
    # Still there and still paused: the keystroke waits in the keyboard controller.
    assert call(api, "GET", "/").json() == {
        "id": "anonymous-instance", "state": "Paused", "vmm_version": "1.14.2",
        "app_name": "Firecracker"}
    assert call(api, "PATCH", "/vm", {"state": "Resumed"}).status == 204
    assert sim.wait() == 0


def test_guest_without_i8042_keeps_running_after_ctrl_alt_del(
        tmp_path: Path, sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(TINY_KERNEL)
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    configure_boot(api, kernel)
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    assert call(api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}).status == 204
    # A later request is answered only after the reboot would have happened.
    time.sleep(0.3)
    assert call(api, "GET", "/").json()["state"] == "Running"  # type: ignore[index]
    assert sim.proc.poll() is None


def test_console_shows_kernel_command_line_then_ready_marker(
        tmp_path: Path, sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(TINY_KERNEL)
    disk = write_disk(tmp_path / "rootfs.ext4")
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    configure_boot(api, kernel, "console=ttyS0 reboot=k panic=1 vmm.token=abc123")
    assert call(api, "PUT", "/drives/rootfs", {
        "drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True,
        "is_read_only": True}).status == 204
    assert "GUEST-READY" not in sim.console_text()
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    lines = sim.console_text().splitlines()
    boot = [n for n, line in enumerate(lines)
            if "console=ttyS0 reboot=k panic=1 vmm.token=abc123 root=/dev/vda ro" in line]
    ready = [n for n, line in enumerate(lines) if line == "GUEST-READY"]
    assert len(boot) == 1 and len(ready) == 1 and boot[0] < ready[0], lines
    # Firecracker's own log lines share the console until a log path is set.
    assert any(line.endswith("[anonymous-instance:main] Running Firecracker v1.14.2")
               for line in lines)


def test_serial_output_file_takes_the_console(tmp_path: Path, sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(TINY_KERNEL)
    serial = tmp_path / "serial.out"
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    configure_boot(api, kernel)
    assert call(api, "PUT", "/serial", {"serial_out_path": str(serial)}).status == 204
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    assert serial.read_text().splitlines()[-1] == "GUEST-READY"
    assert "GUEST-READY" not in sim.console_text()


# The top-level keys of a v1.14.2 metrics line (see the recorded metrics sample).
METRICS_GROUPS = [
    "utc_timestamp_ms", "api_server", "balloon", "block", "deprecated_api", "get_api_requests",
    "i8042", "uart", "latencies_us", "logger", "mmds", "net", "patch_api_requests",
    "put_api_requests", "seccomp", "vcpu", "vmm", "signals", "vsock", "entropy", "pmem",
    "interrupts", "memory_hotplug"]


def test_metrics_lines_have_a_block_object_per_drive(tmp_path: Path,
                                                     sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(TINY_KERNEL)
    metrics = tmp_path / "metrics.json"
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    assert call(api, "PUT", "/metrics", {"metrics_path": str(metrics)}).status == 204
    configure_boot(api, kernel)
    for drive_id, root in (("rootfs", True), ("scratch", False)):
        assert call(api, "PUT", f"/drives/{drive_id}", {
            "drive_id": drive_id, "path_on_host": str(write_disk(tmp_path / f"{drive_id}.img")),
            "is_root_device": root}).status == 204
    assert call(api, "PUT", "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": "simtap0"}).status == 204
    assert not metrics.read_text(), "nothing is written before the microVM starts"
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    assert call(api, "GET", "/").status == 200
    assert call(api, "PATCH", "/drives/scratch", {
        "drive_id": "scratch", "path_on_host": str(tmp_path / "scratch.img")}).status == 204
    assert call(api, "PUT", "/actions", {"action_type": "FlushMetrics"}).status == 204
    at_start, flushed = (json.loads(line) for line in metrics.read_text().splitlines())
    for line in (at_start, flushed):
        assert list(line) == [
            *METRICS_GROUPS[:3], "block_rootfs", "block_scratch", *METRICS_GROUPS[3:11],
            "net_eth0", *METRICS_GROUPS[11:]]
        assert line["block_rootfs"].keys() == line["block"].keys()
        assert line["vcpu"]["exit_io_out_agg"].keys() == {"min_us", "max_us", "sum_us"}
    # Each line holds the counts since the previous one.
    assert at_start["put_api_requests"]["drive_count"] == 2
    assert at_start["put_api_requests"]["actions_count"] == 1
    assert flushed["put_api_requests"]["drive_count"] == 0
    assert flushed["put_api_requests"]["actions_count"] == 1
    assert flushed["get_api_requests"]["instance_info_count"] == 1
    assert flushed["patch_api_requests"]["drive_count"] == 1
    assert flushed["block_scratch"]["update_count"] == 1
    assert flushed["block"]["update_count"] == 1
    # The serial port counted every byte the guest wrote on the console.
    guest_output = [line for line in sim.console_text().splitlines()
                    if line == "GUEST-READY" or line.startswith("[    0.000000] ")]
    assert at_start["uart"]["write_count"] + flushed["uart"]["write_count"] == sum(
        len(line) + 1 for line in guest_output) > 0


def test_metrics_are_written_periodically(tmp_path: Path, sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(TINY_KERNEL)
    metrics = tmp_path / "metrics.json"
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log", "--metrics-path", str(metrics),
                    env={"FIRECRACKER_SIM_METRICS_PERIOD_S": "0.05"})
    sims.append(sim)
    configure_boot(api, kernel)
    assert call(api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    wait_until(lambda: len(metrics.read_text().splitlines()) >= 3, "periodic metrics lines")
    assert all("utc_timestamp_ms" in json.loads(line)
               for line in metrics.read_text().splitlines())


def test_logger_moves_firecracker_log_lines_to_its_file(tmp_path: Path,
                                                        sims: list[SimProcess]) -> None:
    log = tmp_path / "fc.log"
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    assert call(api, "PUT", "/logger",
                {"log_path": str(log), "level": "Info", "show_level": True}).status == 204
    assert call(api, "GET", "/machine-config").status == 200
    assert call(api, "PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}).status \
        == 400
    lines = log.read_text().splitlines()
    # From the answer to PUT /logger on, the lines go to the file.
    assert lines[0].endswith("[anonymous-instance:fc_api:INFO] The request was executed "
                             "successfully. Status code: 204 No Content.")
    assert lines[1].endswith('[anonymous-instance:fc_api:INFO] The API server received a Get '
                             'request on "/machine-config".')
    assert any(":fc_api:ERROR] Received Error. Status code: 400 Bad Request." in line
               for line in lines)
    assert "machine-config" not in sim.console_text()


def test_snapshot_round_trip_into_a_fresh_process(tmp_path: Path,
                                                  sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(I8042_KERNEL)
    disk = write_disk(tmp_path / "rootfs.ext4")
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    source = start_sim(tmp_path / "a.sock", tmp_path / "a.log")
    sims.append(source)
    configure_boot(source.api, kernel)
    assert call(source.api, "PUT", "/machine-config",
                {"vcpu_count": 2, "mem_size_mib": 64}).status == 204
    assert call(source.api, "PUT", "/drives/rootfs", {
        "drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True}).status == 204
    assert call(source.api, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204
    assert call(source.api, "PATCH", "/vm", {"state": "Paused"}).status == 204
    assert call(source.api, "PUT", "/snapshot/create", {
        "snapshot_path": str(snap), "mem_file_path": str(mem)}).status == 204
    assert mem.stat().st_size == 64 * MIB
    expected = call(source.api, "GET", "/vm/config").json()
    source.stop()

    restored = start_sim(tmp_path / "b.sock", tmp_path / "b.log")
    sims.append(restored)
    assert call(restored.api, "PUT", "/snapshot/load", {
        "snapshot_path": str(snap),
        "mem_backend": {"backend_type": "File", "backend_path": str(mem)}}).status == 204
    assert call(restored.api, "GET", "/").json()["state"] == "Paused"  # type: ignore[index]
    assert call(restored.api, "GET", "/vm/config").json() == expected
    assert call(restored.api, "PUT", "/actions",
                {"action_type": "InstanceStart"}).json() == {
        "fault_message": "The requested operation is not supported after starting the microVM."}
    # The restored guest is the same kernel: it still reboots on Ctrl+Alt+Del.
    assert call(restored.api, "PATCH", "/vm", {"state": "Resumed"}).status == 204
    assert call(restored.api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}).status == 204
    assert restored.wait() == 0


def test_failed_snapshot_load_answers_then_exits_1(tmp_path: Path,
                                                   sims: list[SimProcess]) -> None:
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    response = call(api, "PUT", "/snapshot/load", {
        "snapshot_path": str(tmp_path / "missing.snap"), "mem_file_path": str(tmp_path / "m")})
    assert response.status == 400
    assert "Deprecation: true" in response.headers
    assert response.json() == {"fault_message": (
        "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state "
        "from file: Failed to open snapshot file: No such file or directory (os error 2)")}
    assert sim.wait() == 1
    assert "Firecracker exiting with error. exit_code=1" in sim.console_text()


def test_sigterm_kills_like_firecracker_and_the_socket_stays(
        tmp_path: Path, sims: list[SimProcess]) -> None:
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log")
    sims.append(sim)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.wait() == -signal.SIGTERM
    assert api.exists()
    # Like Firecracker, a new process refuses a path that is already there.
    again = subprocess.run(
        [sys.executable, "-m", "tools.simulators.firecracker", "--api-sock", str(api)],
        cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE, check=False)
    assert again.returncode == 1
    assert (f"Failed to open the API socket at: {api}. Check that it is not already used."
            in again.stdout)


def test_config_file_boots_the_microvm_at_start(tmp_path: Path,
                                                sims: list[SimProcess]) -> None:
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(TINY_KERNEL)
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"},
        "drives": [], "machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}))
    api = tmp_path / "fc.sock"
    sim = start_sim(api, tmp_path / "console.log", "--config-file", str(config))
    sims.append(sim)
    wait_until(lambda: "GUEST-READY" in sim.console_text(), "the guest to boot")
    assert call(api, "GET", "/").json()["state"] == "Running"  # type: ignore[index]
    assert call(api, "GET", "/machine-config").json() == {
        "vcpu_count": 2, "mem_size_mib": 256, "smt": False, "track_dirty_pages": False,
        "huge_pages": "None"}
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(tmp_path / "no")},
                                  "drives": []}))
    failed = subprocess.run(
        [sys.executable, "-m", "tools.simulators.firecracker",
         "--api-sock", str(tmp_path / "b.sock"), "--config-file", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE, check=False)
    assert failed.returncode == 1
    assert ("Configuration for VMM from one single json failed: Boot source error: The kernel "
            "file cannot be opened: No such file or directory (os error 2)" in failed.stdout)


def test_command_line_is_parsed_like_firecracker(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.simulators.firecracker", *args], cwd=ROOT,
            capture_output=True, text=True, timeout=PATIENCE, check=False)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("Firecracker v1.14.2\n")
    bogus = run("--api-sock", str(tmp_path / "x.sock"), "--bogus")
    assert bogus.returncode == 153
    assert "Found argument 'bogus' which wasn't expected" in bogus.stdout
    assert run("--no-api").returncode == 153
    assert run("--level", "loud", "--api-sock", str(tmp_path / "y.sock")).returncode == 152


def test_http_framing_matches_micro_http(tmp_path: Path, sims: list[SimProcess]) -> None:
    api = tmp_path / "fc.sock"
    sims.append(start_sim(api, tmp_path / "console.log"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PATIENCE)
        sock.connect(str(api))
        responses = ResponseReader(sock)
        # Two pipelined requests on one keep-alive connection, answered in order.
        sock.sendall(b"GET / HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n\r\n")
        assert responses.next().json()["state"] == "Not started"  # type: ignore[index]
        assert responses.next().body == b'{"firecracker_version":"1.14.2"}'
        # curl's Expect: 100-continue gets an interim answer before the body is sent.
        sock.sendall(b"PUT /logger HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        interim = responses.next()
        assert interim.status_line == "HTTP/1.1 100 " and interim.body == b""
        sock.sendall(b"{}")
        assert responses.next().status_line == "HTTP/1.1 204 "
        # Over the 51200-byte payload limit.
        sock.sendall(b"PUT /mmds HTTP/1.1\r\nContent-Length: 60000\r\n\r\n")
        too_big = responses.next()
        assert too_big.status == 400
        assert too_big.body == (b'{ "error": "Request payload with size 60000 is larger than '
                                b'the limit of 51200 allowed by server.\nAll previous '
                                b'unanswered requests will be dropped." }')


# Answers of the real v1.14.2 binary to requests the recordings do not contain.
OBSERVED = [
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"}, 400,
     "The id from the path [eth0] does not match the id from the body [eth1]!"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "t" * 16}, 400,
     "Network config error: Could not create the network device: Open tap device failed: "
     "Invalid interface name"),
    ("PUT", "/network-interfaces/eth0",
     {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "aa:bb:cc:dd:ee"}, 400,
     "An error occurred when deserializing the json body of a request: The provided MAC "
     "address is invalid. at line 1 column 76."),
    ("PUT", "/network-interfaces/e-1", {"iface_id": "e-1", "host_dev_name": "tap0"}, 400,
     "API Resource IDs can only contain alphanumeric characters and underscores."),
    ("PUT", "/drives", {"drive_id": "d1", "is_root_device": False}, 400,
     "The ID cannot be empty."),
    ("PUT", "/drives/d3", {"drive_id": "d3", "is_root_device": False}, 400,
     "Drive config error: Unable to create the virtio block device: Invalid block config."),
    ("PATCH", "/drives/d4", {"drive_id": "d4"}, 400,
     "The requested operation is not supported before starting the microVM."),
    ("PATCH", "/machine-config", {}, 400, "Empty PATCH request."),
    ("PUT", "/vsock", {"guest_cid": 3}, 400,
     "An error occurred when deserializing the json body of a request: missing field "
     "`uds_path` at line 1 column 16."),
    ("PUT", "/entropy", {"foo": 1}, 400,
     "An error occurred when deserializing the json body of a request: unknown field `foo`, "
     "expected `rate_limiter` at line 1 column 6."),
    ("PUT", "/balloon", {"amount_mib": 200, "deflate_on_oom": True}, 400,
     "Balloon config error: Amount of pages requested is too large."),
    ("GET", "/balloon", None, 400, "Balloon config error: No balloon device found."),
    ("PATCH", "/mmds", {"a": 1}, 400, "MMDS error: The MMDS data store is not initialized."),
    ("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "ipv4_address": "x"}, 400,
     "An error occurred when deserializing the json body of a request: invalid IPv4 address "
     "syntax at line 1 column 52."),
    ("PUT", "/logger", {"level": "bogus"}, 400,
     "An error occurred when deserializing the json body of a request: Invalid LevelFilter at "
     "line 1 column 18."),
    ("PUT", "/machine-config", {"vcpu_count": 300, "mem_size_mib": 64}, 400,
     "An error occurred when deserializing the json body of a request: invalid value: "
     "integer `300`, expected u8 at line 1 column 18."),
    ("PUT", "/machine-config", [1, 64, False, None, False, "None", 7], 400,
     "An error occurred when deserializing the json body of a request: trailing characters "
     "at line 1 column 37."),
    ("PUT", "/snapshot/load", {"snapshot_path": "/x"}, 400,
     "An error occurred when deserializing the json body of a request: missing field: either "
     "`mem_backend` or `mem_file_path` is required."),
    ("PUT", "/snapshot/bogus", {}, 400, "Invalid request method and/or path: PUT "
     "/snapshot/bogus."),
    ("GET", "/drives/x", None, 400, "Invalid request method and/or path: GET drives."),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}, 400,
     "The requested operation is not supported before starting the microVM."),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "fault"), OBSERVED)
def test_answers_observed_on_the_real_binary(tmp_path: Path, sims: list[SimProcess],
                                             method: str, path: str, body: object, status: int,
                                             fault: str) -> None:
    api = tmp_path / "fc.sock"
    sims.append(start_sim(api, tmp_path / "console.log"))
    response = call(api, method, path, body)
    assert response.status == status
    assert response.json() == {"fault_message": fault}


def test_mmds_data_is_kept_like_serde_json_values(tmp_path: Path,
                                                 sims: list[SimProcess]) -> None:
    api = tmp_path / "fc.sock"
    sims.append(start_sim(api, tmp_path / "console.log"))
    body = (b'{"b": 1, "a": {"y": 2.0, "x": 1e23, "w": -0.0, '
            b'"v": 12345678901234567890123, "u": "\\u00e9\\n"}}')
    assert request(api, "PUT", "/mmds", body).status == 204
    assert call(api, "PATCH", "/mmds", {"a": {"y": None}, "c": [1, 2]}).status == 204
    assert call(api, "GET", "/mmds").body == (
        '{"a":{"u":"é\\n","v":1.2345678901234568e22,"w":-0.0,"x":1e23},"b":1,"c":[1,2]}'
        .encode())


# ---- the recordings, verbatim -----------------------------------------------------------

# Recorded with the real Firecracker v1.14.2 binary; $WORK was the scratch folder.
PART_1 = r"""### ===== Part 1: configuration, validation errors, boot (tiny ELF guest), pause/resume, snapshot create, metrics =====
### started: $WORK/firecracker --api-sock $WORK/fc.sock  (pid 21750, stdout+serial -> $WORK/logs/fc-transcript-s1.out)
$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 97

{"id":"anonymous-instance","state":"Not started","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000312s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/version'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 32

{"firecracker_version":"1.14.2"}
[curl time_total=0.000347s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/machine-config'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 93

{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}
[curl time_total=0.000308s]

### --- bad input: machine-config
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 0, "mem_size_mib": 128}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 149

{"fault_message":"Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."}
[curl time_total=0.000361s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 33, "mem_size_mib": 128}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 149

{"fault_message":"Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."}
[curl time_total=0.000298s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 2, "mem_size_mib": 0}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 123

{"fault_message":"Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."}
[curl time_total=0.000237s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 149

{"fault_message":"Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."}
[curl time_total=0.000250s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": "two", "mem_size_mib": 128}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 147

{"fault_message":"An error occurred when deserializing the json body of a request: invalid type: string \"two\", expected u8 at line 1 column 20."}
[curl time_total=0.000218s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"mem_size_mib": 128}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 132

{"fault_message":"An error occurred when deserializing the json body of a request: missing field `vcpu_count` at line 1 column 21."}
[curl time_total=0.000136s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 1, "mem_size_mib": 128, "foo": 1}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 229

{"fault_message":"An error occurred when deserializing the json body of a request: unknown field `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, `cpu_template`, `track_dirty_pages`, `huge_pages` at line 1 column 44."}
[curl time_total=0.000197s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 1, "mem_size_mib": 127, "huge_pages": "2M"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 123

{"fault_message":"Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."}
[curl time_total=0.000317s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 0}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 149

{"fault_message":"Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."}
[curl time_total=0.000267s]

### --- bad input: boot-source
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 138

{"fault_message":"An error occurred when deserializing the json body of a request: missing field `kernel_image_path` at line 1 column 2."}
[curl time_total=0.000202s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{"boot_args": "console=ttyS0"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 139

{"fault_message":"An error occurred when deserializing the json body of a request: missing field `kernel_image_path` at line 1 column 30."}
[curl time_total=0.000240s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{"kernel_image_path": "$WORK/does-not-exist"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 111

{"fault_message":"Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"}
[curl time_total=0.000371s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{"kernel_image_path": "$WORK/tiny/tiny64.elf", "initrd_path": "$WORK/no-initrd"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 154

{"fault_message":"Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. No such file or directory (os error 2)"}
[curl time_total=0.000368s]

### --- bad input: misc
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 1, "mem_size_mib": 128'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 133

{"fault_message":"An error occurred when deserializing the json body of a request: EOF while parsing an object at line 1 column 37."}
[curl time_total=0.000230s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/no-such-path'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 73

{"fault_message":"Invalid request method and/or path: GET no-such-path."}
[curl time_total=0.000145s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X DELETE 'http://localhost/machine-config'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 110

{ "error": "Invalid HTTP Method: Unsupported HTTP method.
All previous unanswered requests will be dropped." }
[curl time_total=0.000163s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "Bogus"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 196

{"fault_message":"An error occurred when deserializing the json body of a request: unknown variant `Bogus`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel` at line 1 column 23."}
[curl time_total=0.000161s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "InstanceStart"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 91

{"fault_message":"Start microvm error: Cannot start microvm without kernel configuration."}
[curl time_total=0.000260s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Paused"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 89

{"fault_message":"The requested operation is not supported before starting the microVM."}
[curl time_total=0.000187s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "SendCtrlAltDel"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 89

{"fault_message":"The requested operation is not supported before starting the microVM."}
[curl time_total=0.000361s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/create' -H 'Content-Type: application/json' -d '{"snapshot_path": "$WORK/snap/x.snap", "mem_file_path": "$WORK/snap/x.mem"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 89

{"fault_message":"The requested operation is not supported before starting the microVM."}
[curl time_total=0.000214s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/drives/rootfs' -H 'Content-Type: application/json' -d '{"drive_id": "rootfs", "path_on_host": "$WORK/no-such.ext4", "is_root_device": false, "is_read_only": false}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 200

{"fault_message":"Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) $WORK/no-such.ext4"}
[curl time_total=0.000348s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/drives/rootfs' -H 'Content-Type: application/json' -d '{"drive_id": "other", "path_on_host": "$WORK/disks/data.ext4", "is_root_device": false, "is_read_only": false}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 77

{"fault_message":"The id from the path does not match the id from the body!"}
[curl time_total=0.000170s]

### --- valid configuration
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/logger' -H 'Content-Type: application/json' -d '{"log_path": "$WORK/logs/fc-s1.log", "level": "Info", "show_level": true}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000254s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/metrics' -H 'Content-Type: application/json' -d '{"metrics_path": "$WORK/logs/fc-s1-metrics.json"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000378s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/metrics' -H 'Content-Type: application/json' -d '{"metrics_path": "$WORK/logs/fc-s1-metrics.json"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 135

{"fault_message":"Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed."}
[curl time_total=0.000242s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{"kernel_image_path": "$WORK/tiny/tiny64.elf", "boot_args": "console=ttyS0"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000362s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 2, "mem_size_mib": 256}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000158s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"track_dirty_pages": true}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000345s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/drives/rootfs' -H 'Content-Type: application/json' -d '{"drive_id": "rootfs", "path_on_host": "$WORK/disks/data.ext4", "is_root_device": true, "is_read_only": false}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000195s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/machine-config'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 92

{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":true,"huge_pages":"None"}
[curl time_total=0.000329s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/vm/config'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 593

{"balloon":null,"drives":[{"drive_id":"rootfs","partuuid":null,"is_root_device":true,"cache_type":"Unsafe","is_read_only":false,"path_on_host":"$WORK/disks/data.ext4","rate_limiter":null,"io_engine":"Sync","socket":null}],"boot-source":{"kernel_image_path":"$WORK/tiny/tiny64.elf","initrd_path":null,"boot_args":"console=ttyS0"},"cpu-config":null,"logger":null,"machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":true,"huge_pages":"None"},"metrics":null,"mmds-config":null,"network-interfaces":[],"vsock":null,"entropy":null,"pmem":[],"memory-hotplug":null}
[curl time_total=0.000247s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "InstanceStart"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.010680s]

### serial output so far: GUEST-READY tiny-elf
$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 93

{"id":"anonymous-instance","state":"Running","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000491s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "InstanceStart"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 88

{"fault_message":"The requested operation is not supported after starting the microVM."}
[curl time_total=0.000236s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 1, "mem_size_mib": 128}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 88

{"fault_message":"The requested operation is not supported after starting the microVM."}
[curl time_total=0.000394s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{"kernel_image_path": "$WORK/tiny/tiny64.elf"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 88

{"fault_message":"The requested operation is not supported after starting the microVM."}
[curl time_total=0.000229s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/drives/rootfs' -H 'Content-Type: application/json' -d '{"drive_id": "rootfs", "path_on_host": "$WORK/disks/data.ext4"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000419s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Running"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 163

{"fault_message":"An error occurred when deserializing the json body of a request: unknown variant `Running`, expected `Paused` or `Resumed` at line 1 column 19."}
[curl time_total=0.000169s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Paused"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000336s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 92

{"id":"anonymous-instance","state":"Paused","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000283s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Paused"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000398s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/create' -H 'Content-Type: application/json' -d '{"snapshot_type": "Full", "snapshot_path": "$WORK/snap/vm.snap", "mem_file_path": "$WORK/snap/vm.mem"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.369285s]

### snapshot files: drwxr-xr-x  2 root root      4096 Nov 27 10:42 .;drwxr-xr-x 17 root root      4096 Nov 27 10:42 ..;-rw-r--r--  1 root root 268435456 Nov 27 10:42 vm.mem;-rw-r--r--  1 root root     31836 Nov 27 10:42 vm.snap;
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/create' -H 'Content-Type: application/json' -d '{"snapshot_type": "Diff", "snapshot_path": "$WORK/snap/vm-diff.snap", "mem_file_path": "$WORK/snap/vm-diff.mem"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.002802s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/create' -H 'Content-Type: application/json' -d '{"snapshot_type": "Full", "snapshot_path": "/nonexistent-dir/vm.snap", "mem_file_path": "/nonexistent-dir/vm.mem"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 131

{"fault_message":"Create snapshot error: Cannot perform open on the snapshot backing file: No such file or directory (os error 2)"}
[curl time_total=0.000703s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Resumed"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000305s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 93

{"id":"anonymous-instance","state":"Running","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000229s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/create' -H 'Content-Type: application/json' -d '{"snapshot_type": "Full", "snapshot_path": "$WORK/snap/vm2.snap", "mem_file_path": "$WORK/snap/vm2.mem"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 135

{"fault_message":"Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running"}
[curl time_total=0.000310s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "FlushMetrics"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000306s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "SendCtrlAltDel"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000262s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 93

{"id":"anonymous-instance","state":"Running","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000287s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/vm/config'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 593

{"balloon":null,"drives":[{"drive_id":"rootfs","partuuid":null,"is_root_device":true,"cache_type":"Unsafe","is_read_only":false,"path_on_host":"$WORK/disks/data.ext4","rate_limiter":null,"io_engine":"Sync","socket":null}],"boot-source":{"kernel_image_path":"$WORK/tiny/tiny64.elf","initrd_path":null,"boot_args":"console=ttyS0"},"cpu-config":null,"logger":null,"machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":true,"huge_pages":"None"},"metrics":null,"mmds-config":null,"network-interfaces":[],"vsock":null,"entropy":null,"pmem":[],"memory-hotplug":null}
[curl time_total=0.000294s]

### killed pid 21750

### ===== Part 2: snapshot load into a fresh process =====
### started: $WORK/firecracker --api-sock $WORK/fc.sock  (pid 21823, stdout+serial -> $WORK/logs/fc-transcript-s2.out)
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/load' -H 'Content-Type: application/json' -d '{"snapshot_path": "$WORK/snap/nope.snap", "mem_backend": {"backend_type": "File", "backend_path": "$WORK/snap/vm.mem"}}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 182

{"fault_message":"Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: No such file or directory (os error 2)"}
[curl time_total=0.000324s]

### killed pid 21823

### started: $WORK/firecracker --api-sock $WORK/fc.sock  (pid 21828, stdout+serial -> $WORK/logs/fc-transcript-s2b.out)
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/load' -H 'Content-Type: application/json' -d '{"snapshot_path": "$WORK/snap/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "$WORK/snap/vm.mem"}, "mem_file_path": "$WORK/snap/vm.mem"}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 166

{"fault_message":"An error occurred when deserializing the json body of a request: too many fields: either `mem_backend` or `mem_file_path` exclusively is required."}
[curl time_total=0.000180s]

### killed pid 21828

### started: $WORK/firecracker --api-sock $WORK/fc.sock  (pid 21833, stdout+serial -> $WORK/logs/fc-transcript-s2c.out)
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 1, "mem_size_mib": 128}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000248s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/load' -H 'Content-Type: application/json' -d '{"snapshot_path": "$WORK/snap/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "$WORK/snap/vm.mem"}}'
HTTP/1.1 400 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 122

{"fault_message":"Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."}
[curl time_total=0.000288s]

### killed pid 21833

### started: $WORK/firecracker --api-sock $WORK/fc.sock  (pid 21839, stdout+serial -> $WORK/logs/fc-transcript-s2d.out)
$ curl -sS -i --unix-socket $WORK/fc.sock -X PUT 'http://localhost/snapshot/load' -H 'Content-Type: application/json' -d '{"snapshot_path": "$WORK/snap/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "$WORK/snap/vm.mem"}, "resume_vm": true}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.010046s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 93

{"id":"anonymous-instance","state":"Running","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000381s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/vm/config'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 594

{"balloon":null,"drives":[{"drive_id":"rootfs","partuuid":null,"is_root_device":true,"cache_type":"Unsafe","is_read_only":false,"path_on_host":"$WORK/disks/data.ext4","rate_limiter":null,"io_engine":"Sync","socket":null}],"boot-source":{"kernel_image_path":"$WORK/tiny/tiny64.elf","initrd_path":null,"boot_args":"console=ttyS0"},"cpu-config":null,"logger":null,"machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":false,"huge_pages":"None"},"metrics":null,"mmds-config":null,"network-interfaces":[],"vsock":null,"entropy":null,"pmem":[],"memory-hotplug":null}
[curl time_total=0.000364s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Paused"}'
HTTP/1.1 204 
Server: Firecracker API
Connection: keep-alive


[curl time_total=0.000362s]

$ curl -sS -i --unix-socket $WORK/fc.sock -X GET 'http://localhost/'
HTTP/1.1 200 
Server: Firecracker API
Connection: keep-alive
Content-Type: application/json
Content-Length: 92

{"id":"anonymous-instance","state":"Paused","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000248s]

### killed pid 21839

"""  # noqa: E501, W291

PART_2 = r"""### started $WORK/firecracker --api-sock $WORK/fc3.sock (pid 23277)
$ curl -sS -i --unix-socket $WORK/fc3.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 32, "mem_size_mib": 128}'
HTTP/1.1 204 


[curl time_total=0.000264s]

$ curl -sS -i --unix-socket $WORK/fc3.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 31, "mem_size_mib": 128}'
HTTP/1.1 204 


[curl time_total=0.000302s]

$ curl -sS -i --unix-socket $WORK/fc3.sock -X PUT 'http://localhost/machine-config' -H 'Content-Type: application/json' -d '{"vcpu_count": 1, "mem_size_mib": 128}'
HTTP/1.1 204 


[curl time_total=0.000265s]

$ curl -sS -i --unix-socket $WORK/fc3.sock -X PUT 'http://localhost/boot-source' -H 'Content-Type: application/json' -d '{"kernel_image_path": "$WORK/kernel/vmlinux", "initrd_path": "$WORK/kernel/initramfs.cpio.gz", "boot_args": "console=ttyS0 reboot=k panic=1 earlyprintk=serial,ttyS0 clearcpuid=141 noxsave"}'
HTTP/1.1 204 


[curl time_total=0.000291s]

### RSS before start: VmRSS:	 2044 kB cpu_ticks=0
$ curl -sS -i --unix-socket $WORK/fc3.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "InstanceStart"}'
HTTP/1.1 204 


[curl time_total=0.077596s]

### RSS 5s after InstanceStart: VmRSS:	 49096 kB cpu_ticks=503
$ curl -sS -i --unix-socket $WORK/fc3.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Paused"}'
HTTP/1.1 204 


[curl time_total=0.000499s]

$ curl -sS -i --unix-socket $WORK/fc3.sock -X GET 'http://localhost/'
HTTP/1.1 200 

{"id":"anonymous-instance","state":"Paused","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000332s]

### paused: VmRSS:	 49096 kB cpu_ticks=505
### paused +3s (cpu ticks should not grow): VmRSS:	 49096 kB cpu_ticks=505
$ curl -sS -i --unix-socket $WORK/fc3.sock -X PATCH 'http://localhost/vm' -H 'Content-Type: application/json' -d '{"state": "Resumed"}'
HTTP/1.1 204 


[curl time_total=0.003163s]

### resumed +3s: VmRSS:	 49100 kB cpu_ticks=804
$ curl -sS -i --unix-socket $WORK/fc3.sock -X PUT 'http://localhost/actions' -H 'Content-Type: application/json' -d '{"action_type": "SendCtrlAltDel"}'
HTTP/1.1 204 


[curl time_total=0.002130s]

### 2s after SendCtrlAltDel: process alive=yes; serial lines=0
$ curl -sS -i --unix-socket $WORK/fc3.sock -X GET 'http://localhost/'
HTTP/1.1 200 

{"id":"anonymous-instance","state":"Running","vmm_version":"1.14.2","app_name":"Firecracker"}
[curl time_total=0.000313s]

### killed 23277
"""  # noqa: E501, W291
