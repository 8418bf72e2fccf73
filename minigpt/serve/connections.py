"""Connection limits uvicorn does not have: a deadline and a size for a request's head, and a cap on connections.

uvicorn reads a request's headers for as long as a client takes and keeps
as many of them as it sends (a slow-loris client holds a connection and its
memory for ever), and it accepts every connection until the process runs out
of file descriptors. Its HTTP protocol is the place to bound that, before any
ASGI code runs: a connection past the cap is answered 503 and closed at once;
a head that has not arrived `read_timeout` seconds after it began is answered
408, one larger than `max_head_bytes` 431, and the connection closed. The
body's deadline and size are the app's (`http.read_json`); idle keep-alive
connections close after uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from minigpt.serve.protocol import error_body

REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class ConnectionLimits:
    """Mixed into uvicorn's HTTP protocol class by `guarded_protocol`, which sets the four limits."""

    read_timeout: float
    max_head_bytes: int
    max_connections: int
    on_refused: Callable[[int], None]

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_bytes, self.head_deadline, self.refused = 0, None, False
        if len(self.connections) > self.max_connections:
            self.refuse(503, f"the server has its {self.max_connections} connections open; retry shortly",
                        "too_many_connections")
        else:
            self.head_deadline = self.loop.call_later(self.read_timeout, self.head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered already: what else comes is read and dropped (see refuse)
            return
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's head is complete: its body is the app's to time
            self.stop_deadline()
            self.head_bytes = 0
        elif (cycle is None or cycle.response_complete) and not self.transport.is_closing():  # still a head
            if self.head_deadline is None:  # the next request's head began on a kept-alive connection
                self.head_deadline = self.loop.call_later(self.read_timeout, self.head_too_slow)
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head_bytes:
                self.refuse(431, f"the request's head is over the {self.max_head_bytes:,}-byte limit",
                            "headers_too_large")

    def connection_lost(self, exc) -> None:
        self.stop_deadline()
        super().connection_lost(exc)

    def stop_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_too_slow(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.refuse(408, f"the request's head did not arrive within {self.read_timeout:g} s", "read_timeout")

    def refuse(self, status: int, message: str, code: str) -> None:
        self.on_refused(status)
        body = json.dumps(error_body(message, code=code, kind="invalid_request_error" if status != 503
                                     else "server_error")).encode()
        self.transport.write(f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        # A close with unread bytes pending is a reset, and the client loses the answer: so end our side,
        # drop what the client still sends for a second (a lingering close, as nginx does), then close.
        self.refused = True
        self.stop_deadline()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(1.0, self.transport.close)


def guarded_protocol(read_timeout: float, max_head_bytes: int, max_connections: int,
                     on_refused: Callable[[int], None]) -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with those limits."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = dict(read_timeout=read_timeout, max_head_bytes=max_head_bytes, max_connections=max_connections,
                  on_refused=staticmethod(on_refused))
    return type("GuardedHTTPProtocol", (ConnectionLimits, AutoHTTPProtocol), limits)
