"""micro_http's request framing, which Firecracker and Cloud Hypervisor both serve their
APIs with: requests cut from a connection's bytes exactly as its HttpConnection does, and the
400 answers it gives to what it cannot frame.

Only GET, PUT and PATCH exist. A request that cannot be framed gets 400 with micro_http's
non-schema body `{ "error": "<reason>\\nAll previous unanswered requests will be dropped." }`.
`Expect: 100-continue` gets an interim `HTTP/1.1 100 `. A body larger than the payload limit
is refused, and what follows the refused request's headers is parsed on as its further
headers, 1024 bytes at a time (RequestFramer). micro_http serves at most MAX_CONNECTIONS
connections at once and answers one more with SERVER_FULL, then closes it.
"""

from __future__ import annotations

from collections.abc import Callable

# micro_http's defaults.
MAX_PAYLOAD = 51200
MAX_CONNECTIONS = 10
SERVER_FULL = (b"HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\n"
               b"Content-Length: 40\r\n\r\n{ \"error\": \"Too many open connections\" }")

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
