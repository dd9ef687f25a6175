"""The HTTP/1.1 server on the API socket, framing requests and answers like micro_http."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tools.simulators.cloud_hypervisor.routes import API_ROOT, Reply, handle
from tools.simulators.cloud_hypervisor.vmm import Vmm

SERVER_HEADER = "Cloud Hypervisor API"
MICRO_HTTP_BAD_METHOD = (
    '{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n'
    'All previous unanswered requests will be dropped." }'
)


class ApiRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def __getattr__(self, name: str) -> Any:
        # micro_http parses only GET, PUT and PATCH; anything else is refused before routing.
        if name.startswith("do_"):
            return self._refuse_method
        raise AttributeError(name)

    def _refuse_method(self) -> None:
        self._send(Reply(400, MICRO_HTTP_BAD_METHOD))
        self.close_connection = True

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else None
        path = self.path.split("?", 1)[0]
        reply = handle(self.server.vmm, method, path, raw)
        self._send(reply)
        self.server.log(f"{method} {path} -> {reply.status}")
        if method == "PUT" and path == API_ROOT + "/vmm.shutdown" and reply.status == 200:
            self.close_connection = True
            self.server.request_exit()

    def _send(self, reply: Reply) -> None:
        payload = (reply.body or "").encode()
        self.send_response_only(reply.status, "")
        self.send_header("Server", SERVER_HEADER)
        self.send_header("Connection", "keep-alive")
        self.send_header("Content-Type", "application/json")
        if reply.status != 204:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: Path, vmm_factory: Callable[[ApiServer], Vmm],
                 log_file: Path | None) -> None:
        self.socket_path = socket_path
        self.exit_requested = threading.Event()
        self.started = time.monotonic()
        self._log = open(log_file, "a", buffering=1) if log_file else None
        # Bound in place, as Cloud Hypervisor does: a client may see the path a moment
        # before the server listens, and must retry a refused connection.
        super().__init__(str(socket_path), ApiRequestHandler)
        self.vmm = vmm_factory(self)

    def request_exit(self) -> None:
        self.exit_requested.set()

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log.write(f"cloud-hypervisor: {time.monotonic() - self.started:.6f}s: "
                            f"<sim> {message}\n")
