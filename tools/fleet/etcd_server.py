"""Real etcd members on free loopback ports, for tests: one alone, or a cluster.

Timings are tuned for a test machine (10 ms heartbeats, 100 ms elections) so
that a start or restart takes well under a second; auto-compaction keeps the
last 1000 revisions, like a small production member would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# The ports etcd uses by default; a test must never touch an etcd a developer runs.
_RESERVED_PORTS = frozenset({2379, 2380})
# Every port handed out so far. The kernel picks a free port at random, so two calls may
# well get the same one while its first taker has not bound it yet (a cluster takes its
# ports before it starts anything); a port is never handed out twice in one process.
_HANDED_OUT: set[int] = set()


class EtcdServerError(RuntimeError):
    """etcd did not start, or did not become healthy, in time."""


def find_etcd() -> str | None:
    """Path of the etcd binary ($ETCD_BINARY, else etcd on PATH), or None when there is none."""
    return os.environ.get("ETCD_BINARY") or shutil.which("etcd")


def free_loopback_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    # Hold every socket open until all are chosen, so the kernel cannot hand one out twice.
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            if port not in _RESERVED_PORTS and port not in _HANDED_OUT:
                ports.append(port)
                _HANDED_OUT.add(port)
        return ports


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_loopback_ports(1)[0]


class EtcdServer:
    """One etcd member. `restart()` keeps its data dir and ports, so clients reconnect.

    The member's files live in `base_dir`: the data dir `data/` and the log `etcd.log`.
    Alone it is a cluster of one; `EtcdCluster` makes members that know each other.
    """

    def __init__(self, base_dir: Path | None = None, *, name: str = "test",
                 start_timeout: float = 20.0, binary: str | None = None,
                 ports: tuple[int, int] | None = None,
                 initial_cluster: str | None = None) -> None:
        found = binary or find_etcd()
        if found is None:
            raise EtcdServerError("no etcd binary on PATH (Debian package etcd-server)")
        self.binary = found
        self._owns_base_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="etcd-test-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.name = name
        self.client_port, self.peer_port = ports or free_loopback_ports(2)
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port of the client API, as gRPC targets spell it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def argv(self) -> list[str]:
        client_url = f"http://{self.endpoint}"
        peer_url = self.peer_url
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "1000",
            "--logger", "zap",
            "--log-outputs", str(self.log_path),
        ]

    def start(self) -> None:
        """Start etcd and wait until it reports itself healthy."""
        self.spawn()
        self.wait_healthy()

    def spawn(self) -> None:
        """Start etcd without waiting (members of a cluster must all be up to elect a leader)."""
        if self.running:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # Anything etcd prints outside its logger (a Go panic) lands in the log too.
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, as a service manager would stop it; SIGKILL if it lingers."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to close connections cleanly."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        """Stop and start again on the same data dir and ports."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill etcd and remove the files it made, if this object made their dir."""
        self.kill()
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"http://{self.endpoint}/health"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                self._process = None
                raise EtcdServerError(f"etcd exited while starting:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if json.load(response).get("health") == "true":
                        return
            time.sleep(0.02)
        self.kill()
        raise EtcdServerError(
            f"etcd did not become healthy within {self.start_timeout}s:\n{self.log_tail()}")


class EtcdCluster:
    """`size` etcd members on loopback that form one cluster, each with its own files
    under `base_dir/<name>`. Losing fewer than half of them keeps it available."""

    def __init__(self, base_dir: Path, size: int = 3, *, start_timeout: float = 30.0) -> None:
        ports = free_loopback_ports(2 * size)
        names = [f"member{i}" for i in range(size)]
        initial_cluster = ",".join(
            f"{name}=http://127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(names))
        self.members = [
            EtcdServer(base_dir / name, name=name, start_timeout=start_timeout,
                       ports=(ports[2 * i], ports[2 * i + 1]), initial_cluster=initial_cluster)
            for i, name in enumerate(names)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> None:
        for member in self.members:
            member.spawn()
        for member in self.members:
            member.wait_healthy()

    def close(self) -> None:
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
