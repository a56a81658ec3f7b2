"""Link-state records: what a KME says of its own links, signed by itself (DECISIONS.md D-26).

Every KME originates one record of its own links — each link's state (``active``, ``suspended``,
or ``down`` when the neighbour at its far end does not answer), and the key bits it can cut on it —
with a sequence number that only grows and the time it was issued. Neighbours flood the record on
unchanged, so every KME holds every KME's newest record and routes over the whole graph
(``kms.peer.routing``). The signature is the origin's ML-DSA identity key over the record's
canonical bytes, under its own context: a trusted node that forwards a record cannot alter it or
forge another KME's links, and a record is only believed when this KME knows the origin's key.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from kms.crypto.identity import KmeIdentity
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.peer.directory import PeerDirectory
from kms.peer.routing import Edge

CONTEXT = b"qkms/link-state/v1"
LINK_STATES = ("active", "suspended", "down")
MAX_LINKS = 256
MAX_ID = 64


class RecordRejected(ValueError):
    """A link-state record that must not be believed; the message is safe to log."""


@dataclass(frozen=True)
class LinkAdvert:
    """One link as its origin sees it: toward ``peer``, in ``state``, with ``bits`` it can cut and
    the ``rate`` (bits/s) of key it received for itself lately (None from a KME that does not
    report it: a record's links are then 4-element lists, as before rates were added)."""

    peer: str
    link_id: str
    state: str
    bits: int
    rate: int | None = None

    def as_list(self) -> list[Any]:
        fields: list[Any] = [self.peer, self.link_id, self.state, self.bits]
        return fields if self.rate is None else [*fields, self.rate]


@dataclass(frozen=True)
class LinkStateRecord:
    origin: str
    seq: int
    issued_at: float
    links: tuple[LinkAdvert, ...]
    key_version: int = 0
    algorithm: str = ""
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """What the signature covers: everything but the signature, canonical JSON."""
        return json.dumps(
            {
                "origin": self.origin,
                "seq": self.seq,
                "issued_at": self.issued_at,
                "links": [a.as_list() for a in self.links],
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "seq": self.seq,
            "issued_at": self.issued_at,
            "links": [a.as_list() for a in self.links],
            "key_version": self.key_version,
            "algorithm": self.algorithm,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @staticmethod
    def from_json(data: Any) -> LinkStateRecord:
        """Parse and bound a received record; ``RecordRejected`` for anything malformed."""
        try:
            links = data["links"]
            if not isinstance(links, list) or len(links) > MAX_LINKS:
                raise RecordRejected(f"a record lists 0 to {MAX_LINKS} links")
            record = LinkStateRecord(
                _ident(data["origin"]),
                int(data["seq"]),
                float(data["issued_at"]),
                tuple(_advert(item) for item in links),
                int(data["key_version"]),
                str(data["algorithm"])[:32],
                base64.b64decode(str(data["signature"]), validate=True),
            )
        except RecordRejected:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordRejected("not a valid link-state record") from exc
        if record.seq < 0 or record.issued_at <= 0:
            raise RecordRejected("a record's sequence number and time must be positive")
        return record

    def edges(self) -> list[Edge]:
        """The record's links as routing edges from its origin."""
        return [
            Edge(self.origin, a.peer, a.link_id, a.state, a.bits, self.issued_at, a.rate) for a in self.links
        ]


def _ident(value: Any) -> str:
    text = str(value)
    if not text or len(text) > MAX_ID:
        raise RecordRejected(f"an ID is 1 to {MAX_ID} characters")
    return text


def _advert(item: Any) -> LinkAdvert:
    if not isinstance(item, list) or len(item) not in (4, 5):
        raise RecordRejected("a link is [peer, link_id, state, bits] or [peer, link_id, state, bits, rate]")
    peer, link_id, state, bits = item[:4]
    rate = int(item[4]) if len(item) == 5 else None
    if state not in LINK_STATES:
        raise RecordRejected(f"a link's state is one of {', '.join(LINK_STATES)}")
    if int(bits) < 0 or (rate is not None and rate < 0):
        raise RecordRejected("a link's bits and rate are not negative")
    return LinkAdvert(_ident(peer), _ident(link_id), str(state), int(bits), rate)


def sign_record(identity: KmeIdentity, record: LinkStateRecord) -> LinkStateRecord:
    """The record signed with this KME's active identity key."""
    version, algorithm, signature = identity.sign(record.signed_bytes(), CONTEXT)
    return LinkStateRecord(
        record.origin, record.seq, record.issued_at, record.links, version, algorithm, signature
    )


def verify_record(record: LinkStateRecord, directory: PeerDirectory, identity: KmeIdentity) -> None:
    """Raise ``RecordRejected`` unless the origin's known key signed the record. A KME whose bundle
    this one lacks cannot be believed (``qkms peer add`` its bundle, without a URL if not adjacent)."""
    if record.origin == directory.kme_id:
        if not identity.verify(record.key_version, record.signed_bytes(), record.signature, CONTEXT):
            raise RecordRejected("a record in this KME's name that it did not sign")
        return
    key = directory.sign_key(record.origin, record.key_version)
    if key is None or key.algorithm != record.algorithm:
        raise RecordRejected(f"no key of {record.origin} is known here to check its link-state record")
    if not identity.signer.verify(
        SignatureAlgorithm(record.algorithm), key.public_key, record.signed_bytes(), record.signature, CONTEXT
    ):
        raise RecordRejected(f"the link-state record of {record.origin} does not verify")
