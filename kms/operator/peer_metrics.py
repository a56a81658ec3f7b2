"""Counts and times the messages a KME sends to adjacent KMEs (``qkms_peer_requests_total``,
``qkms_peer_round_trip_seconds``): the ledger's round trips, relay hops and their outcomes. The
peer client is wrapped where the operator listener is assembled, so the peer protocol itself knows
nothing of metrics. Labels: the peer's configured KME ID, a kind from a fixed vocabulary (the
message type's family), and the outcome by the client's failure classes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kms.peer.client import PeerClient, PeerRefused, PeerUnavailable, PeerUncertain
from kms.peer.messages import PeerMessage
from kms.telemetry.metrics import Instruments

_KINDS = {
    "keys": "ledger",
    "relay": "relay",
    "blocks": "blocks",
    "audit": "audit",
    "topology": "topology",
    "session": "session",
}


def kind_of(msg_type: str) -> str:
    """``keys.record.batch`` -> ``ledger``, ``relay.forward`` -> ``relay``, unknown -> ``other``."""
    return _KINDS.get(msg_type.split(".", 1)[0], "other")


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, PeerRefused):
        return "refused"
    if isinstance(exc, PeerUnavailable):
        return "unavailable"
    if isinstance(exc, PeerUncertain):
        return "uncertain"
    return "error"


def count_peer_calls(client: PeerClient, instruments: Instruments, peers: set[str]) -> None:
    """Replace ``client.call`` on this instance by one that counts and times each message.
    ``peers``: the configured KME IDs (anything else is labelled ``other``)."""
    call: Callable[[str, str, dict[str, Any]], PeerMessage] = client.call

    def counted_call(peer_id: str, msg_type: str, body: dict[str, Any]) -> PeerMessage:
        peer = peer_id if peer_id in peers else "other"
        kind = kind_of(msg_type)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return call(peer_id, msg_type, body)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            instruments.peer_seconds.labels(peer, kind).observe(time.perf_counter() - started)
            instruments.peer_requests.labels(peer, kind, outcome_of(failure)).inc()

    client.call = counted_call  # type: ignore[method-assign]
