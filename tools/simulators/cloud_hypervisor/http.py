"""The HTTP/1.1 server on the API socket: micro_http's framing and limits, Cloud Hypervisor's
answers.

Cloud Hypervisor serves its API with micro_http (tools.simulators.micro_http): requests are
framed as it frames them, what it cannot frame (an unknown method, a body over 51,200 bytes,
...) gets its own 400 answer with its own `Server: Firecracker API` header, and an eleventh
connection at once gets its 503 and is closed. Cloud Hypervisor's own answers say
`Server: Cloud Hypervisor API`.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tools.simulators.cloud_hypervisor.routes import API_ROOT, Reply, handle
from tools.simulators.cloud_hypervisor.vmm import Vmm
from tools.simulators.micro_http import (
    MAX_CONNECTIONS,
    MAX_PAYLOAD,
    SERVER_FULL,
    Request,
    RequestFramer,
)

SERVER_HEADER = "Cloud Hypervisor API"


def encode(reply: Reply) -> bytes:
    payload = (reply.body or "").encode()
    head = (f"HTTP/1.1 {reply.status} \r\nServer: {SERVER_HEADER}\r\nConnection: keep-alive\r\n"
            "Content-Type: application/json\r\n")
    if reply.status != 204:
        head += f"Content-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload


class ApiConnection(socketserver.BaseRequestHandler):
    server: ApiServer
    request: socket.socket

    def handle(self) -> None:
        framer = RequestFramer(MAX_PAYLOAD)
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            for item in framer.feed(data):
                if not isinstance(item, Request):
                    self.request.sendall(item.encode())  # micro_http's own answer
                    continue
                reply = handle(self.server.vmm, item.method, item.path, item.body)
                self.request.sendall(encode(reply))
                self.server.log(f"{item.method} {item.path} -> {reply.status}")
                if item.path == API_ROOT + "/vmm.shutdown" and reply.status == 200:
                    self.server.request_exit()
                    return


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: Path, vmm_factory: Callable[[ApiServer], Vmm],
                 log_file: Path | None, verbosity: int = 0) -> None:
        self.socket_path = socket_path
        self.exit_requested = threading.Event()
        self.started = time.monotonic()
        # File::create, as Cloud Hypervisor opens its log: each start truncates it. Without
        # -v only warnings are logged, and no API request is one (they are info).
        self._log = open(log_file, "w", buffering=1) if log_file else None
        self.verbosity = verbosity
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # Bound in place, as Cloud Hypervisor does: a client may see the path a moment
        # before the server listens, and must retry a refused connection.
        super().__init__(str(socket_path), ApiConnection)
        self.vmm = vmm_factory(self)

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: object) -> None:
        if not self._connections.acquire(blocking=False):
            try:
                request.sendall(SERVER_FULL)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def request_exit(self) -> None:
        self.exit_requested.set()

    def log(self, message: str) -> None:
        """An info line: written with -v."""
        if self._log is not None and self.verbosity >= 1:
            self._log.write(f"cloud-hypervisor: {time.monotonic() - self.started:.6f}s: "
                            f"<sim> {message}\n")
