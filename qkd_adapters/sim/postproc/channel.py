"""The authenticated classical channel between Alice's and Bob's post-processing.

QKD is only secure over an *authenticated* classical channel (Bennett, Brassard 1984; Renner
2005): every message of sifting, reconciliation, verification and privacy amplification must
be authenticated, or a man in the middle simply runs QKD with each side. Every message of the
simulated post-processing therefore passes through one :class:`ClassicalChannel`, which

* serialises nothing itself: payloads are ``bytes`` already, so a test can tamper with them;
* signs each message (sequence number, direction, kind, payload) with a pluggable
  :class:`Authenticator` and verifies it on receipt; a failed check raises
  :class:`ChannelAuthenticationError`, which aborts the block;
* counts messages and bits in each direction, and the bits the protocol declares as *leaked*
  (parities, syndromes, hash tags), so that the leak used by privacy amplification can be
  recomputed from the channel alone.

The KMS plugs its ML-DSA signer in through :class:`Authenticator`; this module never imports it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Party = Literal["alice", "bob"]
PARTIES: tuple[Party, Party] = ("alice", "bob")


class ChannelAuthenticationError(RuntimeError):
    """A message failed authentication: the block must be aborted (never carries payloads)."""


@runtime_checkable
class Authenticator(Protocol):
    """Signs and verifies classical messages (HMAC for tests, ML-DSA in the KMS)."""

    def sign(self, payload: bytes) -> bytes: ...

    def verify(self, payload: bytes, tag: bytes) -> bool: ...


class NoAuthenticator:
    """No authentication at all: only for benchmarks of the algorithms themselves."""

    def sign(self, payload: bytes) -> bytes:
        return b""

    def verify(self, payload: bytes, tag: bytes) -> bool:
        return tag == b""


class HmacAuthenticator:
    """HMAC-SHA-256 with a pre-shared key (RFC 2104): the usual stand-in in tests.

    A real link authenticates with information-theoretic MACs keyed from earlier QKD key, or
    with post-quantum signatures (docs/DECISIONS.md D-5); HMAC has the same interface.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("HMAC key must be at least 16 bytes")
        self._key = bytes(key)

    def sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def verify(self, payload: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.sign(payload), tag)

    def __repr__(self) -> str:
        return "HmacAuthenticator(<key hidden>)"


@dataclass(frozen=True)
class Message:
    """One message in flight: header fields, payload and authentication tag."""

    seq: int
    sender: Party
    kind: str
    payload: bytes
    tag: bytes
    leaked_bits: int = 0

    def signed_bytes(self) -> bytes:
        """What the tag covers: sequence number, direction, kind and payload."""
        return _header(self.seq, self.sender, self.kind) + self.payload


TamperHook = Callable[[Message], Message]


@dataclass
class DirectionStats:
    """Counters for one direction of the channel."""

    messages: int = 0
    payload_bits: int = 0
    tag_bits: int = 0
    leaked_bits: int = 0
    leaked_by_kind: dict[str, int] = field(default_factory=dict)
    messages_by_kind: dict[str, int] = field(default_factory=dict)


class ClassicalChannel:
    """An authenticated, counted, in-process channel between Alice and Bob.

    ``send`` returns the payload *as received* by the other party, after the tamper hook (if
    any) and the authenticator's check. Sequence numbers are authenticated, so replays and
    reordering fail too. ``record`` keeps every delivered message (tests recompute leaks).
    """

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        *,
        tamper: TamperHook | None = None,
        record: bool = False,
    ) -> None:
        self._auth: Authenticator = authenticator if authenticator is not None else NoAuthenticator()
        self.tamper = tamper
        self._record = record
        self.log: list[Message] = []
        self.stats: dict[Party, DirectionStats] = {p: DirectionStats() for p in PARTIES}
        self._seq = 0

    @property
    def authenticator(self) -> Authenticator:
        return self._auth

    def send(self, sender: Party, kind: str, payload: bytes, *, leaked_bits: int = 0) -> bytes:
        """Send ``payload`` from ``sender`` to the other party; return what the receiver accepted.

        ``leaked_bits`` is the number of bits of information about the key this message
        discloses (parity bits, hash tags); it is added to the sender's leak counter.
        """
        if sender not in PARTIES:
            raise ValueError("sender must be 'alice' or 'bob'")
        if leaked_bits < 0:
            raise ValueError("leaked_bits must be >= 0")
        seq = self._seq
        self._seq += 1
        tag = self._auth.sign(_header(seq, sender, kind) + payload)
        msg = Message(seq, sender, kind, payload, tag, leaked_bits)
        delivered = self.tamper(msg) if self.tamper is not None else msg
        # The receiver checks against its own expectation of sequence number and direction.
        expected_header = _header(seq, sender, delivered.kind)
        if delivered.kind != kind or not self._auth.verify(
            expected_header + delivered.payload, delivered.tag
        ):
            raise ChannelAuthenticationError(f"message {seq} ({kind!r} from {sender}) failed authentication")
        st = self.stats[sender]
        st.messages += 1
        st.payload_bits += 8 * len(payload)
        st.tag_bits += 8 * len(tag)
        st.leaked_bits += leaked_bits
        st.leaked_by_kind[kind] = st.leaked_by_kind.get(kind, 0) + leaked_bits
        st.messages_by_kind[kind] = st.messages_by_kind.get(kind, 0) + 1
        if self._record:
            self.log.append(delivered)
        return delivered.payload

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.stats.values())

    @property
    def leaked_bits(self) -> int:
        """Bits disclosed about the key, both directions."""
        return sum(s.leaked_bits for s in self.stats.values())

    def leaked_by_kind(self, kind: str) -> int:
        """Leak declared by messages of one kind, both directions."""
        return sum(s.leaked_by_kind.get(kind, 0) for s in self.stats.values())

    def summary(self) -> dict[str, dict[str, int]]:
        """Counters per direction, as plain ints (for provenance)."""
        return {
            f"{p}->{'bob' if p == 'alice' else 'alice'}": {
                "messages": s.messages,
                "payload_bits": s.payload_bits,
                "tag_bits": s.tag_bits,
                "leaked_bits": s.leaked_bits,
            }
            for p, s in self.stats.items()
        }


def _header(seq: int, sender: str, kind: str) -> bytes:
    k = kind.encode()
    return struct.pack(">QB", seq, 0 if sender == "alice" else 1) + struct.pack(">H", len(k)) + k
