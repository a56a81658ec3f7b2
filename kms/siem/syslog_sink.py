"""The audit stream to a syslog receiver: RFC 5424 messages, octet-counted (RFC 6587) over TCP or TLS.

Plain syslog over TCP has no acknowledgement from the receiving application, and ``send`` returns
once the bytes are in this host's kernel: a receiver that dies loses what it had not read yet. So a
batch counts as delivered only when (1) the kernel's send queue for the connection is empty
(``SIOCOUTQ``: the receiver's TCP has acknowledged every byte), (2) the connection has then stayed
up for ``confirm_seconds`` (time for the receiver to read and store them), and (3) the receiver has
not closed it. A receiver never writes on a syslog connection, so anything readable on it other than
TLS session tickets is its end. What is not delivered when the connection fails is sent again on the
next one (duplicates, with the same seq and hash, which the SIEM can drop).
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import ssl
import struct
import termios
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kms.domain.audit_chain import AuditRecord
from kms.siem.records import octet_counted, syslog_message
from kms.siem.sink import SinkError


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int
    tls: ssl.SSLContext | None
    server_name: str
    facility: int
    hostname: str
    connect_timeout: float
    confirm_seconds: float


@dataclass
class _Batch:
    seq: int
    hash: str
    acked_at: float | None = None


class SyslogSink:
    name = "syslog"

    def __init__(self, target: SyslogTarget, kme_id: str) -> None:
        self.target = target
        self.kme_id = kme_id
        self._sock: socket.socket | None = None
        self._pending: deque[_Batch] = deque()

    def send(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        t = self.target
        payload = b"".join(
            octet_counted(syslog_message(r, self.kme_id, t.facility, t.hostname)) for r in records
        )
        sock = self._connected()
        try:
            sock.sendall(payload)
        except (OSError, ssl.SSLError) as exc:
            self.reset()
            raise SinkError(f"syslog receiver {t.host}:{t.port}: send failed: {_reason(exc)}") from exc
        self._pending.append(_Batch(records[-1].seq, records[-1].hash))

    def delivered(self) -> tuple[int, str] | None:
        if self._sock is None or not self._pending:
            return None
        if self._closed_by_receiver(self._sock):
            self.reset()
            raise SinkError(f"syslog receiver {self.target.host}:{self.target.port} closed the connection")
        now = time.monotonic()
        if _unacknowledged_bytes(self._sock) == 0:
            for batch in self._pending:
                if batch.acked_at is None:
                    batch.acked_at = now
        done: _Batch | None = None
        while self._pending:
            first = self._pending[0]
            if first.acked_at is None or now - first.acked_at < self.target.confirm_seconds:
                break
            done = self._pending.popleft()
        return None if done is None else (done.seq, done.hash)

    def in_flight(self) -> int:
        return len(self._pending)

    def reset(self) -> None:
        self._pending.clear()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        t = self.target
        try:
            sock = socket.create_connection((t.host, t.port), timeout=t.connect_timeout)
        except OSError as exc:
            raise SinkError(f"syslog receiver {t.host}:{t.port}: cannot connect: {_reason(exc)}") from exc
        if t.tls is not None:
            try:
                sock = t.tls.wrap_socket(sock, server_hostname=t.server_name)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise SinkError(f"syslog receiver {t.host}:{t.port}: TLS failed: {_reason(exc)}") from exc
        sock.settimeout(t.connect_timeout)
        self._sock = sock
        return sock

    def _closed_by_receiver(self, sock: socket.socket) -> bool:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return False
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # TLS 1.3 session tickets: nothing for the application
        except (OSError, ssl.SSLError):
            return True
        finally:
            sock.settimeout(self.target.connect_timeout)
        del data  # EOF (empty), or bytes a syslog receiver never sends: either way its end
        return True


def _unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes in the connection's send queue not yet acknowledged by the receiver's TCP (Linux)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
