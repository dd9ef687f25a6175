"""Firecracker's HTTP/1.1 API transport: framing like its micro_http crate, on one thread.

Only GET, PUT and PATCH exist; every response says `Server: Firecracker API` and
`Connection: keep-alive` and has no reason phrase (`HTTP/1.1 204 `). A request
that cannot be framed gets 400 with micro_http's non-schema body
`{ "error": "<reason>\\nAll previous unanswered requests will be dropped." }`.
`Expect: 100-continue` gets an interim `HTTP/1.1 100 `. Bodies larger than the
payload limit (51200 bytes unless `--http-api-max-payload-size`) are refused, and
what follows the refused request's headers is parsed on as its further headers,
1024 bytes at a time, as micro_http does (RequestFramer).

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

METHODS = ("GET", "PUT", "PATCH")
VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
DROPPED = "\nAll previous unanswered requests will be dropped."


class Request:
    def __init__(self, method: str, path: str, body: bytes | None) -> None:
        self.method = method  # GET, PUT or PATCH
        self.path = path  # the URI's absolute path
        self.body = body  # None without a body or with Content-Length: 0


class Response:
    def __init__(self, status: int, body: bytes | None = None,
                 deprecation: bool = False) -> None:
        self.status = status
        self.body = body
        self.deprecation = deprecation
        # Runs once the response has been handed to the socket.
        self.after: Callable[[], None] | None = None

    def encode(self) -> bytes:
        head = f"HTTP/1.1 {self.status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        if self.deprecation:
            head += "Deprecation: true\r\n"
        if self.body is None:
            return head.encode() + b"\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n"
        return head.encode() + self.body


class FramingError(Exception):
    """A request micro_http refuses before Firecracker sees it."""

    def response(self) -> Response:
        body = '{ "error": "' + str(self) + DROPPED + '" }'
        return Response(400, body.encode())


CONTINUE = Response(100)
# micro_http reads a connection into a buffer of this many bytes; a request line or header
# line must fit in it.
BUFFER_SIZE = 1024


class _Pending:
    """The request whose headers are being read: what its headers said so far."""

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self.length = 0
        self.expect_continue = False


class RequestFramer:
    """Cuts one connection's byte stream into requests, as micro_http's HttpConnection does.

    The bytes are taken BUFFER_SIZE at a time into one buffer, and a state machine (request
    line, headers, body) walks it. A framing error answers 400 and drops the requests framed
    since the last read, but resets nothing else: the state machine carries on from where it
    stood, over the bytes that follow. So after a payload over the limit, the rest of that
    request's body is read as more header lines of the refused request.
    """

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.buffer = bytearray()  # bytes [0, read_cursor) carried over from the last read
        self.state = "request_line"
        self.pending: _Pending | None = None
        self.body = bytearray()
        self.body_to_read = 0

    def feed(self, data: bytes) -> list[Request | Response]:
        """New bytes in; complete requests, interim 100s and framing errors out."""
        out: list[Request | Response] = []
        view = memoryview(data)
        while view:
            room = BUFFER_SIZE - len(self.buffer)
            chunk, view = view[:room], view[room:]
            out.extend(self._read(bytes(chunk)))
        return out

    def _read(self, chunk: bytes) -> list[Request | Response]:
        """One read of micro_http (HttpConnection::try_read)."""
        read_cursor = len(self.buffer)
        self.buffer += chunk
        framed: list[Request | Response] = []
        try:
            self._parse(framed)
        except FramingError as err:
            # The buffer keeps only what it held before this read; the next read overwrites
            # the rest. Requests framed in this read are never answered.
            del self.buffer[read_cursor:]
            dropped: list[Request | Response] = [item for item in framed if item is CONTINUE]
            return [*dropped, err.response()]
        return framed

    def _parse(self, out: list[Request | Response]) -> None:
        start, end = 0, len(self.buffer)
        while True:
            if self.state == "request_line":
                line_end = self.buffer.find(b"\r\n", start, end)
                if line_end < 0:
                    if end == BUFFER_SIZE and start == 0:
                        raise FramingError("Invalid request.")
                    del self.buffer[:start]  # keep the incomplete line for the next read
                    return
                method, path = _request_line(bytes(self.buffer[start:line_end]))
                self.pending = _Pending(method, path)
                self.state = "headers"
                start = line_end + 2
            elif self.state == "headers":
                assert self.pending is not None
                line_end = self.buffer.find(b"\r\n", start, end)
                if line_end < 0:
                    if start == 0 and end == BUFFER_SIZE:
                        raise FramingError(
                            "Invalid header. Reason: Invalid content length. Header: "
                            + bytes(self.buffer).decode("utf-8", "replace"))
                    del self.buffer[:start]
                    return
                if line_end == start:  # the blank line that ends the headers
                    length = self.pending.length
                    if length > self.max_payload:
                        raise FramingError(f"Request payload with size {length} is larger "
                                           f"than the limit of {self.max_payload} allowed by "
                                           "server.")
                    if length and self.pending.expect_continue:
                        out.append(CONTINUE)
                    self.body_to_read = length
                    self.state = "body" if length else "ready"
                else:
                    _header_line(bytes(self.buffer[start:line_end]), self.pending)
                start = line_end + 2
            elif self.state == "body":
                available = end - start
                if self.body_to_read > available:
                    self.body += self.buffer[start:end]
                    self.body_to_read -= available
                    self.buffer.clear()
                    return
                self.body += self.buffer[start:start + self.body_to_read]
                start += self.body_to_read
                self.body_to_read = 0
                self.state = "ready"
            else:  # ready
                assert self.pending is not None
                out.append(Request(self.pending.method, self.pending.path,
                                   bytes(self.body) or None))
                self.body.clear()
                self.state = "request_line"


def _request_line(line: bytes) -> tuple[str, str]:
    method, sep, rest = line.partition(b" ")
    uri, sep2, version = rest.partition(b" ")
    if not sep or not sep2:
        raise FramingError("Invalid request.")
    if method.decode("latin-1") not in METHODS:
        raise FramingError("Invalid HTTP Method: Unsupported HTTP method.")
    if not uri:
        raise FramingError("Invalid URI: Empty URI not allowed.")
    if version not in VERSIONS:
        raise FramingError("Invalid HTTP Version: Unsupported HTTP version.")
    return method.decode(), _abs_path(uri.decode("utf-8", "replace"))


def _abs_path(uri: str) -> str:
    """micro_http's Uri::get_abs_path: the path of an absolute URI, else "" unless it starts
    with '/'."""
    if uri.startswith("http://"):
        rest = uri[len("http://"):]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else ""
    return uri if uri.startswith("/") else ""


def _header_line(line: bytes, pending: _Pending) -> None:
    name, colon, value = line.partition(b":")
    if not colon:
        raise FramingError("Invalid header. Reason: Header is incorrectly formatted. Key: "
                           + line.decode("utf-8", "replace"))
    key = name.strip().lower()
    text = value.strip().decode("utf-8", "replace")
    if key == b"content-length":
        if not text.isascii() or not text.isdigit():
            raise FramingError(
                f"Invalid header. Reason: Invalid value. Key:Content-Length; Value: {text}")
        pending.length = int(text)
    elif key == b"transfer-encoding" and text.lower() == "chunked":
        raise FramingError("Invalid request.")
    elif key == b"expect" and text.lower() == "100-continue":
        pending.expect_continue = True


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
