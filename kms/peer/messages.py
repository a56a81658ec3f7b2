"""Signed, replay-protected KME-to-KME messages.

Every message and every reply is a JSON envelope — type, sender, recipient, a per-process session
ID with a sequence number, a 128-bit nonce, a timestamp, the body — signed with the sender's
ML-DSA-65 identity key (docs/DECISIONS.md D-5; mTLS underneath). The signature covers the exact bytes sent,
so nothing is re-serialised before checking. The receiver rejects a wrong recipient, a sender that
is not the authenticated TLS peer, a timestamp outside the allowed skew, and (in the database, see
``peer_repository.remember_message``) any nonce or (session, seq) seen before. A reply names the nonce it
answers, so an old reply cannot be passed off for a new request.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from kms.crypto.identity import KmeIdentity
from kms.crypto.peer_mac import mac_tag, tag_matches
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.peer.directory import PeerDirectory

CONTEXT = b"qkms/peer/v1"
MAC_SCHEME = "hmac-sha256"
UNKNOWN_MAC_KEY = "unknown MAC key"
SIGNATURE_HEADER = "qkms-signature"
MESSAGES_PATH = "/peer/v1/messages"  # the one POST every peer message travels on
VERSION = 1


class MessageRejected(Exception):
    """A peer message that must not be acted on; ``reason`` is safe to log and to answer with."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PeerMessage:
    type: str
    sender: str
    recipient: str
    session: str
    seq: int
    nonce: str
    ts: float
    body: dict[str, Any]
    reply_to: str | None = None
    # (key_id, key) when the message was authenticated by a MAC, not a signature: its reply uses
    # the same key. Never logged or serialised.
    mac: tuple[str, bytes] | None = field(default=None, repr=False, compare=False)


class MessageSealer:
    """Signs this process's outgoing messages; one session ID per process, sequence numbers in order."""

    def __init__(self, kme_id: str, identity: KmeIdentity) -> None:
        self.kme_id = kme_id
        self.identity = identity
        self.session = uuid.uuid4().hex
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def seal(
        self,
        recipient: str,
        msg_type: str,
        body: dict[str, Any],
        reply_to: str | None = None,
        mac: tuple[str, bytes] | None = None,
    ) -> tuple[PeerMessage, bytes, str]:
        """The message, the exact bytes to send, and the header value: an ML-DSA signature, or with
        ``mac`` (key_id, key) an HMAC-SHA256 tag under that key (DECISIONS.md D-35)."""
        with self._lock:
            seq = next(self._seq)
        message = PeerMessage(
            msg_type,
            self.kme_id,
            recipient,
            self.session,
            seq,
            secrets.token_hex(16),
            time.time(),
            body,
            reply_to,
        )
        raw = json.dumps(
            {
                "v": VERSION,
                "type": message.type,
                "from": message.sender,
                "to": message.recipient,
                "session": message.session,
                "seq": message.seq,
                "nonce": message.nonce,
                "ts": message.ts,
                "reply_to": message.reply_to,
                "body": message.body,
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        if mac is not None:
            tag = mac_tag(mac[1], raw, reply=reply_to is not None)
            return message, raw, f"{MAC_SCHEME};k={mac[0]};tag={base64.b64encode(tag).decode()}"
        version, algorithm, signature = self.identity.sign(raw, CONTEXT)
        header = f"{algorithm};v={version};sig={base64.b64encode(signature).decode()}"
        return message, raw, header


MacLookup = Callable[[str, str], "bytes | None"]
"""The MAC key (sender, key_id) names, or None if unknown here."""


def open_message(
    raw: bytes,
    header: str | None,
    directory: PeerDirectory,
    identity: KmeIdentity,
    max_skew: float,
    authenticated_sender: str | None = None,
    mac_lookup: MacLookup | None = None,
    mac_accepted: Callable[[PeerMessage], bool] | None = None,
) -> PeerMessage:
    """Check signature (or MAC), recipient, sender and freshness; raise ``MessageRejected`` with the
    reason. A MAC is accepted only with ``mac_lookup`` and for messages ``mac_accepted`` allows."""
    if not header:
        raise MessageRejected("the message is not signed")
    try:
        data = json.loads(raw)
        message = PeerMessage(
            str(data["type"]),
            str(data["from"]),
            str(data["to"]),
            str(data["session"]),
            int(data["seq"]),
            str(data["nonce"]),
            float(data["ts"]),
            dict(data["body"]),
            None if data.get("reply_to") is None else str(data["reply_to"]),
        )
        if data.get("v") != VERSION or len(message.nonce) != 32 or len(message.session) > 64:
            raise ValueError("unsupported envelope")
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageRejected("the message is not a valid peer envelope") from exc
    if authenticated_sender is not None and message.sender != authenticated_sender:
        raise MessageRejected("the message's sender is not the KME that presented the TLS certificate")
    if message.recipient != directory.kme_id:
        raise MessageRejected("the message is addressed to another KME")
    if header.startswith(MAC_SCHEME + ";"):
        message = _check_mac(message, raw, header, mac_lookup, mac_accepted)
        if abs(time.time() - message.ts) > max_skew:
            raise MessageRejected("the message's timestamp is outside the allowed clock skew")
        return message
    algorithm, version, signature = _parse_header(header)
    key = directory.sign_key(message.sender, version)
    if key is None or key.algorithm != algorithm:
        raise MessageRejected(f"no {algorithm} key version {version} is known for {message.sender}")
    if not identity.signer.verify(SignatureAlgorithm(algorithm), key.public_key, raw, signature, CONTEXT):
        raise MessageRejected("the message's signature does not verify")
    if abs(time.time() - message.ts) > max_skew:
        raise MessageRejected("the message's timestamp is outside the allowed clock skew")
    return message


def _parse_header(header: str) -> tuple[str, int, bytes]:
    try:
        algorithm, version_part, sig_part = header.split(";", 2)
        if not version_part.startswith("v=") or not sig_part.startswith("sig="):
            raise ValueError("malformed")
        return algorithm, int(version_part[2:]), base64.b64decode(sig_part[4:], validate=True)
    except (ValueError, TypeError) as exc:
        raise MessageRejected("the signature header is malformed") from exc


def _check_mac(
    message: PeerMessage,
    raw: bytes,
    header: str,
    lookup: MacLookup | None,
    accepted: Callable[[PeerMessage], bool] | None,
) -> PeerMessage:
    if lookup is None or accepted is None or not accepted(message):
        raise MessageRejected(f"a {message.type} message must be signed, not MAC'd")
    try:
        _, key_part, tag_part = header.split(";", 2)
        if not key_part.startswith("k=") or not tag_part.startswith("tag="):
            raise ValueError("malformed")
        key_id, tag = key_part[2:], base64.b64decode(tag_part[4:], validate=True)
    except (ValueError, TypeError) as exc:
        raise MessageRejected("the MAC header is malformed") from exc
    key = lookup(message.sender, key_id)
    if key is None:
        raise MessageRejected(f"{UNKNOWN_MAC_KEY} {key_id} from {message.sender}")
    if not tag_matches(key, raw, message.reply_to is not None, tag):
        raise MessageRejected("the message's MAC does not verify")
    return replace(message, mac=(key_id, key))


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header of raw ``(name, value)`` pairs (an ASGI scope's or httpcore's), by lower-case name."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
