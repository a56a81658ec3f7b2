"""Bounds what one TLS connection can make the server hold, and for how long.

The body limit (``body_limit``) only starts once headers are parsed, and uvicorn's httptools protocol
has no limit of its own on a request line or on headers: one connection that sends header lines and
never ends them grows the process without bound, and one that sends nothing (or trickles bytes) holds
a connection forever. This protocol subclass counts the bytes of every request head as they arrive
(request line and headers together, so one endless header line is caught too), the number of headers,
the length of each header line and of the URL, and puts a deadline on each phase of a request: the
connection's first bytes, the head, the body. A request that breaks a limit is answered 400 with an
ETSI Error body and the connection is closed, before the rest is read; malformed HTTP, which uvicorn
answers with a ``text/plain`` 400, gets the same Error body.
"""

from __future__ import annotations

import asyncio
import json
from asyncio import TimerHandle
from enum import Enum
from typing import Any

import structlog

from kms.config import ServerSection
from qkd_adapters.tls_identity import TlsIdentityProtocol

log = structlog.get_logger(__name__)


class _Phase(Enum):
    IDLE = "idle"  # no request in progress: waiting for the first byte of one
    HEAD = "head"  # request line and headers arriving
    BODY = "body"  # headers complete, body arriving
    WAIT = "wait"  # request complete, the application is answering


class _Refused(Exception):
    """Internal: the request broke a limit; raised from a parser callback to stop parsing."""


def error_bytes(message: str) -> bytes:
    """A whole HTTP/1.1 400 response with an ETSI Error body, closing the connection."""
    body = json.dumps({"message": message}, separators=(",", ":")).encode()
    head = (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n"
    )
    return head + body


class HardenedProtocol(TlsIdentityProtocol):
    """TlsIdentityProtocol with head limits, phase deadlines and Error bodies for malformed HTTP.

    Subclassed per server with :func:`hardened_protocol`, which sets ``limits``.
    """

    limits: ServerSection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.IDLE
        self._head_room = self.limits.max_head_bytes
        self._header_count = 0
        self._timer: TimerHandle | None = None
        self._timer_phase: _Phase | None = None
        self._refusal: str | None = None

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(_Phase.IDLE, self.limits.idle_timeout_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, but never more head bytes than the limit allows: what is past it is
        not handed to the parser (nor kept) once the head is over its limit."""
        if self.transport.is_closing():
            return
        if self._phase is _Phase.IDLE:
            self._start_head()
        while data:
            if self._phase is _Phase.HEAD:
                if self._head_room <= 0:
                    self._refuse(f"request line and headers exceed {self.limits.max_head_bytes} bytes")
                    return
                chunk, data = data[: self._head_room], data[self._head_room :]
                self._head_room -= len(chunk)
            else:
                chunk, data = data, b""
            super().data_received(chunk)
            if self.transport.is_closing():
                return
        if self._phase is _Phase.HEAD and self._head_room <= 0:
            self._refuse(f"request line and headers exceed {self.limits.max_head_bytes} bytes")
            return
        # Deadlines only for requests that span more than one read: a request that arrives whole
        # costs no timer.
        if self._phase is _Phase.HEAD:
            self._arm(_Phase.HEAD, self.limits.header_timeout_seconds)
        elif self._phase is _Phase.BODY:
            self._arm(_Phase.BODY, self.limits.body_timeout_seconds)
        else:  # the request is complete: the application answers, then uvicorn's keep-alive runs
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to malformed HTTP (a ``text/plain`` 400), as an ETSI Error body."""
        self._refuse(self._refusal or "malformed HTTP request")

    def on_response_complete(self) -> None:
        if self._phase is _Phase.WAIT:
            self._phase = _Phase.IDLE
        super().on_response_complete()

    # -- parser callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._phase is not _Phase.HEAD:
            self._start_head()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._refusal = f"request URL longer than {self.limits.max_url_bytes} bytes"
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = f"more than {self.limits.max_headers} request headers"
            raise _Refused
        if len(name) + len(value) + 2 > self.limits.max_header_line_bytes:
            self._refusal = f"a request header line is longer than {self.limits.max_header_line_bytes} bytes"
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.parser.get_http_version() not in ("1.0", "1.1"):  # llhttp takes 0.9 and 2.0 too
            self._refusal = "only HTTP/1.1 and HTTP/1.0 are served"
            raise _Refused
        super().on_headers_complete()
        self._phase = _Phase.BODY

    def on_message_complete(self) -> None:
        self._phase = _Phase.WAIT
        super().on_message_complete()

    # -- deadlines and refusals ------------------------------------------------------------------
    def _start_head(self) -> None:
        self._phase = _Phase.HEAD
        self._head_room = self.limits.max_head_bytes
        self._header_count = 0

    def _arm(self, phase: _Phase, seconds: float) -> None:
        if self._timer_phase is phase:
            return  # the deadline runs from the phase's first read, not its latest
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, phase)
        self._timer_phase = phase

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_phase = None

    def _expired(self, phase: _Phase) -> None:
        self._timer = None
        self._timer_phase = None
        if self.transport.is_closing():
            return
        if phase is _Phase.IDLE:
            self.transport.close()  # nothing asked, nothing to answer
        elif phase is _Phase.HEAD:
            self._refuse(f"request headers not complete within {self.limits.header_timeout_seconds:g} s")
        else:
            self._refuse(f"request body not complete within {self.limits.body_timeout_seconds:g} s")

    def _refuse(self, message: str) -> None:
        """Answer 400 with an Error body where HTTP allows one, and close the connection. A request
        the application is handling sees a disconnect, and its answer is dropped."""
        self._disarm()
        cycle = self.cycle  # the latest request whose head was complete
        if self._phase in (_Phase.IDLE, _Phase.HEAD):
            # The refused request has no cycle yet; answer only if the one before it is answered.
            may_answer = cycle is None or cycle.response_complete
        else:
            may_answer = cycle is None or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        log.warning("http_request_refused", reason=message, client=self.client)
        if may_answer and not self.transport.is_closing():
            self.transport.write(error_bytes(message))
        self.transport.close()


def hardened_protocol(limits: ServerSection) -> type[HardenedProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to ``limits``."""
    return type("HardenedProtocol", (HardenedProtocol,), {"limits": limits})
