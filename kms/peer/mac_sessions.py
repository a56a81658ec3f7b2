"""Which peer messages may carry a MAC instead of a signature, and this process's MAC keys toward
its neighbours (DECISIONS.md D-35).

Every hop of a relay signed its request and its reply with ML-DSA-65: two signatures and two checks
per hop, the larger part of a hop's CPU. Between neighbours, a key established once by an
ML-DSA-signed ``session.key`` message (ML-KEM to the neighbour's key) now authenticates the hop's
messages with HMAC-SHA256. Signatures stay where a signed statement is the point: the ledger entry at
the target KME and its receipt (D-20), batches of them, withdrawals, audit copies, and the key
establishment itself.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from kms.crypto.identity import KmeIdentity
from kms.crypto.peer_mac import derive_mac_key
from kms.crypto.pqc.base import KemAlgorithm
from kms.peer.directory import PeerDirectory
from kms.peer.messages import PeerMessage

MAC_TYPES = frozenset({"topology", "topology.flood", "blocks.announce", "pieces.claim", "relay.forward"})
RENEW_SECONDS = 3600.0
DECLINED_SECONDS = 600.0  # a neighbour that refused a MAC key is asked again after this long


def mac_allowed(msg_type: str, body: dict[str, Any], recipient: str) -> bool:
    """Hop-by-hop messages, and a ledger entry to a trusted node that relays it on (not its target)."""
    if msg_type in MAC_TYPES:
        return True
    if msg_type == "keys.record":
        route = body.get("route")
        return isinstance(route, list) and len(route) > 2 and route[-1] != recipient
    return False


def request_mac_accepted(message: PeerMessage) -> bool:
    return mac_allowed(message.type, message.body, message.recipient)


Establish = Callable[[str, dict[str, Any]], PeerMessage]
"""Send a signed ``session.key`` message to a peer; its verified reply."""


class MacSessions:
    """This process's MAC key toward each neighbour: established on first use, renewed hourly."""

    def __init__(self, kme_id: str, directory: PeerDirectory, identity: KmeIdentity) -> None:
        self.kme_id = kme_id
        self.directory = directory
        self.identity = identity
        self._keys: dict[str, tuple[str, bytes, float]] = {}
        self._declined: dict[str, float] = {}  # peer -> monotonic time it refused a MAC key
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def key_for(self, peer_id: str, establish: Establish) -> tuple[str, bytes] | None:
        """(key_id, key) toward ``peer_id``, establishing one if needed; None to sign instead (no
        ML-KEM key is known for the peer, or it declined one lately)."""
        refused = self._declined.get(peer_id)
        if refused is not None and time.monotonic() - refused < DECLINED_SECONDS:
            return None
        held = self._keys.get(peer_id)
        if held is not None and time.monotonic() - held[2] < RENEW_SECONDS:
            return held[0], held[1]
        with self._guard:
            lock = self._locks.setdefault(peer_id, threading.Lock())
        with lock:
            held = self._keys.get(peer_id)
            if held is not None and time.monotonic() - held[2] < RENEW_SECONDS:
                return held[0], held[1]
            made = self._establish(peer_id, establish)
            if made is not None:
                self._keys[peer_id] = (*made, time.monotonic())
            return made

    def _establish(self, peer_id: str, establish: Establish) -> tuple[str, bytes] | None:
        kem = self.directory.kem_key(peer_id)
        if kem is None:
            return None
        ciphertext, shared = self.identity.kem.encapsulate(KemAlgorithm(kem.algorithm), kem.public_key)
        key_id = secrets.token_hex(8)
        body = {
            "key_id": key_id,
            "kem_version": kem.version,
            "algorithm": kem.algorithm,
            "ciphertext": base64.b64encode(ciphertext).decode(),
        }
        establish(peer_id, body)  # raises PeerError if the peer did not take it
        return key_id, derive_mac_key(shared, self.kme_id, peer_id, key_id)

    def declined(self, peer_id: str) -> None:
        """The peer refused a MAC key (MACs off there, or it predates them): sign to it for a while."""
        self._declined[peer_id] = time.monotonic()

    def drop(self, peer_id: str, key_id: str) -> None:
        """The peer does not know this key (restored, or its KEK rotated): establish a new one."""
        held = self._keys.get(peer_id)
        if held is not None and held[0] == key_id:
            self._keys.pop(peer_id, None)
