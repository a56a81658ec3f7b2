"""Calls to other KMEs: mTLS with this KME's ``kme`` client certificate, signed requests, verified replies.

The transport is httpcore, the connection pool under httpx, used directly: every ledger batch of
two-site delivery is one call, and httpx's request and response models cost about as much CPU
again as the pool itself (1.2-1.5 ms against 0.6 ms a call on the 2-core CI box; DECISIONS.md
D-20). Its exceptions are the ones httpx maps its own from, so the classification below is the same.

Failures are classified because they decide what happens to the key bits at stake:
``PeerUnavailable`` — the request never reached the peer (connection refused, or the peer failed a
moment ago and is not retried yet); ``PeerUncertain`` — the peer may have acted (timeout or
server error after sending); ``PeerRefused`` — the peer answered that it did not act.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from typing import Any

import httpcore
import structlog
from structlog.contextvars import get_contextvars

from kms.config import PeeringSection
from kms.crypto.identity import KmeIdentity
from kms.peer.directory import PeerDirectory
from kms.peer.mac_sessions import MacSessions, mac_allowed
from kms.peer.messages import (
    MESSAGES_PATH,
    SIGNATURE_HEADER,
    UNKNOWN_MAC_KEY,
    MessageRejected,
    MessageSealer,
    PeerMessage,
    header_value,
    open_message,
)

log = structlog.get_logger(__name__)
RETRY_AFTER_FAILURE = 1.0
SIGNATURE_HEADER_BYTES = SIGNATURE_HEADER.encode()


class PeerError(Exception):
    def __init__(self, peer: str, reason: str, sent: PeerMessage | None = None) -> None:
        """``sent``: the request the peer may have received (for ``PeerUncertain``), so that a
        ``keys.cancel`` can name it and the peer never acts on it if it arrives late."""
        super().__init__(f"KME {peer}: {reason}")
        self.peer = peer
        self.reason = reason
        self.sent = sent


class PeerUnavailable(PeerError):
    """The peer did not receive the request."""


class PeerUncertain(PeerError):
    """The peer may or may not have acted on the request."""


class PeerRefused(PeerError):
    """The peer received the request and did not act on it."""


class PeerClient:
    def __init__(
        self, kme_id: str, cfg: PeeringSection, directory: PeerDirectory, identity: KmeIdentity
    ) -> None:
        self.cfg = cfg
        self.directory = directory
        self.identity = identity
        self.sealer = MessageSealer(kme_id, identity)
        self.mac_sessions = MacSessions(kme_id, directory, identity)
        self._pools: dict[str, httpcore.ConnectionPool] = {}
        self._down_until: dict[str, float] = {}
        self._failing_since: dict[str, float] = {}  # peers whose last call failed in transport
        self._lock = threading.Lock()

    def _pool(self, peer_id: str) -> tuple[httpcore.ConnectionPool, str]:
        """The peer's connection pool and its messages URL."""
        peer = self.directory.get(peer_id)
        if peer is None or not peer.url:
            raise PeerUnavailable(peer_id, "no URL is configured for this KME (not an adjacent peer)")
        with self._lock:
            pool = self._pools.get(peer_id)
            if pool is None:
                ctx = ssl.create_default_context(cadata=peer.bundle.ca_cert_pem)
                ctx.load_cert_chain(str(self.cfg.client_cert), str(self.cfg.client_key))
                pool = httpcore.ConnectionPool(
                    ssl_context=ctx, max_connections=64, max_keepalive_connections=32
                )
                self._pools[peer_id] = pool
        return pool, peer.url.rstrip("/") + MESSAGES_PATH

    def call(self, peer_id: str, msg_type: str, body: dict[str, Any]) -> PeerMessage:
        """Send one message and return the peer's verified reply (never an ``error`` reply). Hop-by-hop
        messages carry a MAC under this process's key with the peer (``mac_sessions``), the others
        an ML-DSA signature; a peer that does not know the key, or declines MAC keys, gets the
        message signed instead."""
        mac = None
        if self.cfg.hop_macs and mac_allowed(msg_type, body, peer_id):
            try:
                mac = self.mac_sessions.key_for(peer_id, self._establish)
            except PeerRefused:  # MACs off there, or a version before them: sign to it for a while
                self.mac_sessions.declined(peer_id)
        try:
            return self._call(peer_id, msg_type, body, mac)
        except PeerRefused as exc:
            if mac is None or UNKNOWN_MAC_KEY not in exc.reason:
                raise
            self.mac_sessions.drop(peer_id, mac[0])
            return self._call(peer_id, msg_type, body, None)

    def _establish(self, peer_id: str, body: dict[str, Any]) -> PeerMessage:
        return self._call(peer_id, "session.key", body, None)

    def _call(
        self, peer_id: str, msg_type: str, body: dict[str, Any], mac: tuple[str, bytes] | None
    ) -> PeerMessage:
        pool, url = self._pool(peer_id)
        request, raw, header = self.sealer.seal(peer_id, msg_type, body, mac=mac)
        headers = [
            (b"host", _host(url)),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (SIGNATURE_HEADER_BYTES, header.encode()),
        ]
        request_id = get_contextvars().get("request_id")
        if request_id is not None:  # the SAE request this message serves: the peer logs it too
            headers.append((b"x-request-id", str(request_id).encode()))
        timeout = self.cfg.timeout_seconds
        try:
            response = pool.request(
                "POST",
                url,
                headers=headers,
                content=raw,
                extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)},
            )
        except httpcore.ConnectError as exc:
            self._down_until[peer_id] = time.monotonic() + RETRY_AFTER_FAILURE
            self._failing_since.setdefault(peer_id, time.monotonic())
            raise PeerUnavailable(peer_id, f"unreachable ({type(exc).__name__}: {str(exc)[:120]})") from exc
        except httpcore.TimeoutException as exc:
            self._failing_since.setdefault(peer_id, time.monotonic())
            raise PeerUncertain(peer_id, f"no answer within {timeout:g} s", request) from exc
        except TRANSPORT_ERRORS as exc:
            self._failing_since.setdefault(peer_id, time.monotonic())
            raise PeerUncertain(
                peer_id, f"connection failed mid-request ({type(exc).__name__})", request
            ) from exc
        self._down_until.pop(peer_id, None)
        self._failing_since.pop(peer_id, None)
        if response.status >= 500:
            raise PeerUncertain(peer_id, f"answered {response.status}", request)
        if response.status != 200:
            raise PeerRefused(peer_id, f"answered {response.status}: {_message(response.content)}")
        try:
            reply = open_message(
                response.content,
                header_value(response.headers, SIGNATURE_HEADER_BYTES),
                self.directory,
                self.identity,
                self.cfg.max_clock_skew_seconds,
                authenticated_sender=peer_id,
                mac_lookup=lambda sender, key_id: (
                    mac[1] if mac and (sender, key_id) == (peer_id, mac[0]) else None
                ),
                mac_accepted=lambda _reply: mac is not None,
            )
        except MessageRejected as exc:
            raise PeerUncertain(peer_id, f"its reply was rejected: {exc.reason}", request) from exc
        if reply.reply_to != request.nonce:
            raise PeerUncertain(peer_id, "its reply answers another request", request)
        if reply.type == "error":
            raise PeerRefused(peer_id, str(reply.body.get("message", "refused"))[:300])
        return reply

    def recently_unreachable(self, peer_id: str) -> bool:
        """True for a moment after a connection to the peer failed: callers about to spend key bits on
        a request check this first and answer 503 without cutting anything."""
        return time.monotonic() < self._down_until.get(peer_id, 0.0)

    def heard_from(self, peer_id: str) -> None:
        """A verified message from the peer arrived: it is up, whatever our last call to it met."""
        self._failing_since.pop(peer_id, None)
        self._down_until.pop(peer_id, None)

    def down_peers(self) -> frozenset[str]:
        """Adjacent KMEs whose last call from this process failed to connect or went unanswered:
        routing avoids them and the link-state record says their links are down until one answers."""
        return frozenset(self._failing_since.copy())  # dict.copy is atomic under the GIL

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


# Every other way a call can fail after the connection was made (httpx maps the same ones).
TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


def _host(url: str) -> bytes:
    """The Host header for ``https://host:port/...`` (HTTP/1.1 requires one; httpcore adds none)."""
    return url.split("://", 1)[1].split("/", 1)[0].encode()


def _message(content: bytes) -> str:
    """The ``message`` of an Error body, or the start of whatever else came back."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace")
    return str(parsed.get("message", "") if isinstance(parsed, dict) else parsed)[:300]
