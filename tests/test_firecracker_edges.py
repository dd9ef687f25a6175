"""Firecracker v1.14.2 at the edges the shared recordings do not reach, recorded once from the
real binary (tests/fixtures/firecracker-v1.14.2-edges.json) and replayed against
firecracker-sim, and against the real binary wherever one is installed.

Each scenario starts a fresh process and sends raw HTTP requests; the fixture holds every
byte each request got back. Scenarios: a kernel path that is a directory, the kernel
command line's 2,048-byte capacity (at PUT /boot-source, and at InstanceStart once
Firecracker has added its own parameters), a balloon whose guest has no balloon driver, a
request body over the 51,200-byte payload limit, and vhost-user drive fields.

Re-record with the real binary: `python tests/test_firecracker_edges.py /opt/fc/firecracker`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import binary_from_environment

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).with_name("fixtures") / "firecracker-v1.14.2-edges.json"
# Generous bound for things that take milliseconds; never asserted on.
PATIENCE = 10.0
# Seconds of silence that end a recorded answer (only when recording).
RECORD_QUIET = 0.5
PAYLOAD_LIMIT = 51200


def put(path: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    return (f"PUT {path} HTTP/1.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def patch(path: str, body: object) -> bytes:
    return b"PATCH" + put(path, body)[3:]


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\n\r\n".encode()


START = put("/actions", {"action_type": "InstanceStart"})
MACHINE = put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})


def boot_source(kernel: str, args: str) -> bytes:
    return put("/boot-source", {"kernel_image_path": kernel, "boot_args": args})


def root_drive() -> bytes:
    return put("/drives/root", {"drive_id": "root", "is_root_device": True,
                                "is_read_only": False, "path_on_host": "$WORK/root.img"})


def oversized_body() -> bytes:
    """A body one byte over the limit, made of header-like lines: micro_http refuses the
    request at its headers' end, then reads the body on as more header lines of it."""
    head = f"PUT /machine-config HTTP/1.1\r\nContent-Length: {PAYLOAD_LIMIT + 1}\r\n\r\n"
    line = "X-Padding: " + "p" * 87 + "\r\n"
    body = line * (PAYLOAD_LIMIT // len(line) - 1)
    body += "X-Last: " + "q" * (PAYLOAD_LIMIT + 1 - len(body) - len("X-Last: \r\n\r\n"))
    body += "\r\n\r\n"
    assert len(body) == PAYLOAD_LIMIT + 1
    # What a client sends next on that connection: the line cannot be a header.
    return (head + body).encode() + get("/version")


# Each scenario: one process; its steps are (connection, request bytes). Requests on the
# same connection number share one connection; "$WORK" and "$TINY" are filled in.
SCENARIOS: dict[str, list[tuple[int, bytes]]] = {
    "kernel path is a directory": [
        (0, MACHINE), (0, boot_source("$WORK/kernel-dir", "console=ttyS0")), (0, START),
        (0, get("/"))],
    "boot args of 2047 and 2048 bytes": [
        (0, boot_source("$TINY", "a" * 2047)), (0, boot_source("$TINY", "a" * 2048)),
        (0, boot_source("$TINY", "\u00e9" * 1024))],
    "command line too long once firecracker adds root= and its devices": [
        (0, MACHINE), (0, boot_source("$TINY", "console=ttyS0 " + "a" * 1974)),
        (0, root_drive()), (0, START), (0, get("/"))],
    "command line just within the capacity": [
        (0, MACHINE), (0, boot_source("$TINY", "console=ttyS0 " + "a" * 1973)),
        (0, root_drive()), (0, START), (0, get("/"))],
    "balloon of a guest without the balloon driver": [
        (0, MACHINE), (0, boot_source("$TINY", "console=ttyS0")),
        (0, put("/balloon", {"amount_mib": 10, "deflate_on_oom": False,
                             "stats_polling_interval_s": 1, "free_page_hinting": True})),
        (0, patch("/balloon", {"amount_mib": 20})), (0, START),
        (0, patch("/balloon", {"amount_mib": 20})), (0, get("/balloon")),
        (0, get("/balloon/statistics")), (0, patch("/balloon/hinting/start", {})),
        (0, get("/balloon/hinting/status")), (0, patch("/balloon", {"amount_mib": 500}))],
    "a body over the payload limit": [
        (0, put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128,
                                    "smt": False, "pad": " " * 40000})),
        (1, oversized_body()), (1, get("/")), (2, get("/"))],
    "vhost-user drive with virtio-block fields": [
        (0, put("/drives/vu", {"drive_id": "vu", "is_root_device": False,
                               "socket": "$WORK/vhost.sock", "is_read_only": True})),
        (0, put("/drives/vu", {"drive_id": "vu", "is_root_device": False,
                               "socket": "$WORK/vhost.sock", "io_engine": "Sync"})),
        (0, put("/drives/vu", {"drive_id": "vu", "is_root_device": False,
                               "socket": "$WORK/vhost.sock", "cache_type": "Writeback"}))],
}


# ---- running a scenario -----------------------------------------------------------------


@dataclass
class Process:
    api: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=PATIENCE)


def start(argv: list[str], work: Path) -> Process:
    api = work / "fc.sock"
    api.unlink(missing_ok=True)
    with open(work / "console.out", "ab") as out:
        proc = subprocess.Popen([*argv, "--api-sock", str(api)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + PATIENCE
    while True:
        assert proc.poll() is None, (work / "console.out").read_text()
        assert time.monotonic() < deadline, "no API socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(api))
                return Process(api, proc)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.005)


def responses_in(data: bytes) -> list[bytes]:
    """Complete HTTP responses at the start of data, each with its framing."""
    out = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


def exchange(sock: socket.socket, request: bytes, answers: int | None) -> list[bytes]:
    """Send request; read `answers` responses, or (recording) all until the line is quiet."""
    sock.sendall(request)
    data = b""
    sock.settimeout(RECORD_QUIET if answers is None else PATIENCE)
    while answers is None or len(responses_in(data)) < answers:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            assert answers is None, f"only {responses_in(data)} of {answers} answers"
            break
        assert chunk, "connection closed"
        data += chunk
    return responses_in(data)


def fill(request: bytes, work: Path, tiny: Path) -> bytes:
    """The request with $WORK and $TINY filled in, its Content-Length updated to match."""
    def filled(data: bytes) -> bytes:
        return data.replace(b"$WORK", str(work).encode()).replace(b"$TINY", str(tiny).encode())

    head, blank, body = request.partition(b"\r\n\r\n")
    if filled(body) != body:
        body = filled(body)
        head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
    return filled(head) + blank + body


def unfill(data: bytes, work: Path, tiny: Path) -> str:
    return data.replace(str(work).encode(), b"$WORK").replace(
        str(tiny).encode(), b"$TINY").decode("utf-8", "replace")


def run_scenario(argv: list[str], work: Path, tiny: Path, steps: list[tuple[int, bytes]],
                 recorded: list[list[str]] | None = None) -> list[list[str]]:
    """Every step's answers, with $WORK/$TINY put back in place of the paths."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "kernel-dir").mkdir(exist_ok=True)
    with open(work / "root.img", "wb") as disk:
        disk.truncate(1 << 20)
    process = start(argv, work)
    sockets: dict[int, socket.socket] = {}
    got: list[list[str]] = []
    try:
        for number, (connection, request) in enumerate(steps):
            if connection not in sockets:
                sockets[connection] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sockets[connection].connect(str(process.api))
            answers = None if recorded is None else len(recorded[number])
            got.append([unfill(r, work, tiny) for r in
                        exchange(sockets[connection], fill(request, work, tiny), answers)])
    finally:
        for sock in sockets.values():
            sock.close()
        process.stop()
    return got


def tiny_kernel() -> Path:
    from tools.guests.images import GuestBuildError, default_cache_dir, tiny_guest

    try:
        return tiny_guest(default_cache_dir()).elf64
    except GuestBuildError as e:
        pytest.skip(f"cannot build the tiny guest: {e}")


# ---- the tests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording() -> dict[str, list[list[str]]]:
    scenarios: dict[str, list[list[str]]] = json.loads(FIXTURE.read_text())["scenarios"]
    return scenarios


def test_the_recording_covers_every_scenario(recording: dict[str, list[list[str]]]) -> None:
    assert list(recording) == list(SCENARIOS)
    for name, steps in SCENARIOS.items():
        assert len(recording[name]) == len(steps), name


def real_firecracker() -> Iterator[str]:
    binary = binary_from_environment("firecracker") or shutil.which("firecracker")
    if binary is None:
        pytest.skip("no firecracker binary: set VMM_AGENT_FIRECRACKER_BINARY or put "
                    "firecracker on PATH")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("firecracker needs read/write access to /dev/kvm, which this machine lacks")
    yield binary


@pytest.fixture(params=["simulator", "real"])
def firecracker(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    if request.param == "real":
        for binary in real_firecracker():
            yield [binary]
    else:
        yield [sys.executable, "-m", "tools.simulators.firecracker"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_answers_match_the_real_binary(name: str, firecracker: list[str], tmp_path: Path,
                                       recording: dict[str, list[list[str]]]) -> None:
    # A short work dir: the API socket's path must fit in 107 bytes.
    work = Path(f"/tmp/fc-edges-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        got = run_scenario(firecracker, work, tiny_kernel(), SCENARIOS[name], recording[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for number, (answers, expected) in enumerate(zip(got, recording[name], strict=True)):
        assert answers == expected, f"{name}: step {number}"


def record(binary: str) -> None:
    tiny = tiny_kernel()
    work = Path(f"/tmp/fc-edges-{os.getpid()}")
    scenarios = {}
    for name, steps in SCENARIOS.items():
        shutil.rmtree(work, ignore_errors=True)
        scenarios[name] = run_scenario([binary], work, tiny, steps)
    shutil.rmtree(work, ignore_errors=True)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"recorded_with": version, "scenarios": scenarios},
                                  indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    record(sys.argv[1])
