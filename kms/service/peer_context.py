"""What the peer use cases (``peer_ledger``, ``peer_records``, ``peer_relay``, ``peer_mirror``,
``peer_sweep``) work with: this KME as a site of the network, the received message as far as a unit
needs it (its replay identity). The link stock ``kms.peer`` routes by is ``link_stock``.

The replay check of a received message (``remember``) runs inside the unit that acts on it: the
message is remembered in the same transaction as its effect, so a replay is refused and a refused
message is not remembered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import Connection

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.crypto.identity import KmeIdentity
from kms.domain.errors import PeerRequestRefused
from kms.domain.saes import SaeRegistry
from kms.storage import peer_repository as peers
from kms.storage.database import Database


@dataclass(frozen=True)
class PeerSite:
    """This KME as the peer use cases see it: its ID and pool limits, the database, the KEK envelope,
    its PQC identity and the SAE registry (remote SAEs included)."""

    kme_id: str
    cfg: PoolSection
    db: Database
    envelope: Envelope
    identity: KmeIdentity
    registry: SaeRegistry


class Received(Protocol):
    """A verified peer message (``kms.peer.messages.PeerMessage``) as a unit needs it: who sent it
    and what identifies it against replay."""

    @property
    def type(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def session(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def nonce(self) -> str: ...


def remember(conn: Connection, message: Received) -> None:
    """Record ``message`` as seen, in the caller's transaction; refuse it if it was seen before."""
    if not peers.remember_message(
        conn, message.sender, message.nonce, message.session, message.seq, message.type, datetime.now(UTC)
    ):
        raise PeerRequestRefused("replayed message (nonce or sequence number seen before)")


def remember_alone(db: Database, message: Received) -> None:
    """:func:`remember` in a transaction of its own (a message that changes nothing else: topology)."""
    with db.write() as conn:
        remember(conn, message)


def check_link(conn: Connection, link_id: str, sender: str) -> str:
    """``link_id`` is a link with ``sender``; its state here."""
    link = peers.peer_link(conn, link_id)
    if link is None or link[0] != sender:
        raise PeerRequestRefused(f"link {link_id} is not a link with {sender}")
    return link[1]
