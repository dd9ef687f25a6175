"""Firecracker's HTTP/1.1 API transport on one thread, framing requests with micro_http's
rules (tools.simulators.micro_http).

Every response says `Server: Firecracker API` and `Connection: keep-alive` and has no reason
phrase (`HTTP/1.1 204 `). The payload limit is 51200 bytes unless
`--http-api-max-payload-size` says otherwise.

The event loop is a plain selector loop, as Firecracker's API thread is an
epoll loop: no asyncio, so a simulator process starts in a few tens of ms.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import socket
import time
from collections.abc import Callable

from tools.simulators.micro_http import Request, RequestFramer, Response

# ---- the event loop -------------------------------------------------------------------


class Timer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Readiness callbacks and timers on one selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.running = True

    def watch(self, sock: socket.socket, events: int,
              callback: Callable[[int], None]) -> None:
        try:
            self.selector.modify(sock, events, callback)
        except KeyError:
            self.selector.register(sock, events, callback)

    def unwatch(self, sock: socket.socket) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), timer))
        return timer

    def run(self) -> None:
        while self.running:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, mask in self.selector.select(timeout):
                key.data(mask)
                if not self.running:
                    return
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self.running:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    timer.callback()

    def stop(self) -> None:
        self.running = False


class Connection:
    def __init__(self, server: ApiServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.framer = RequestFramer(server.max_payload)
        self.out = bytearray()
        sock.setblocking(False)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        for item in self.framer.feed(data):
            response = item if isinstance(item, Response) else self.server.handler(item)
            self.send(response.encode())
            if response.after is not None:
                response.after()
            if self.sock.fileno() < 0 or not self.server.loop.running:
                return

    def send(self, data: bytes) -> None:
        self.out += data
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        self.server.loop.watch(self.sock, events, self.on_event)

    def drain(self, timeout: float) -> None:
        """Block until buffered output is written (before the process exits)."""
        if not self.out or self.sock.fileno() < 0:
            return
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(self.out)
        except OSError:
            pass
        self.out.clear()

    def close(self) -> None:
        self.server.loop.unwatch(self.sock)
        self.server.connections.discard(self)
        self.sock.close()


class ApiServer:
    """Accepts connections on the API socket and answers each request in order."""

    def __init__(self, loop: EventLoop, listener: socket.socket,
                 handler: Callable[[Request], Response], max_payload: int) -> None:
        self.loop = loop
        self.listener = listener
        self.handler = handler
        self.max_payload = max_payload
        self.connections: set[Connection] = set()
        listener.setblocking(False)
        loop.watch(listener, selectors.EVENT_READ, self._accept)

    def _accept(self, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        conn = Connection(self, sock)
        self.connections.add(conn)
        self.loop.watch(sock, selectors.EVENT_READ, conn.on_event)

    def stop_listening(self) -> None:
        """New connections are refused from now on (the socket file stays)."""
        self.loop.unwatch(self.listener)
        self.listener.close()

    def drain(self, timeout: float = 1.0) -> None:
        for conn in list(self.connections):
            conn.drain(timeout)


def bind_unix(path: str) -> socket.socket:
    """Listen on a Unix socket path, as Firecracker does: bind, then listen; OSError if it
    cannot be bound. (A client may see the path a moment before it accepts connections,
    exactly as with the real binary.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    os.set_inheritable(sock.fileno(), False)
    return sock
