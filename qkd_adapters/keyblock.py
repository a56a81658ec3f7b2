"""The one interface between key sources and the KMS: key blocks with provenance.

A *key block* is a run of secret bits that both ends of a link hold identically, named by a block ID
that both ends agree on, and carrying the provenance a security team needs to judge it: which
protocol produced it, over what distance, at what QBER, how much was leaked to reconciliation,
and under which security parameters. Adapters also report *alarms* (an aborted block, an
eavesdropper signature, a failed verification) so that the KMS can suspend a link.

Material is held as ``bytes``; Python cannot guarantee that copies are wiped, so the KMS keeps
material encrypted at rest and drops references as soon as it has stored a block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable


class KeySourceError(RuntimeError):
    """A key source failed in a way the caller should report (device down, bad file, ...)."""


@dataclass(frozen=True)
class Provenance:
    """Where a block's bits came from. Everything here is metadata: never key material.

    ``is_qkd`` is True only for bits produced by a quantum key distribution protocol (simulated or
    real). A test source built on a classical random generator must say ``is_qkd=False`` so that
    nothing is labelled QKD that is not.
    """

    protocol: str
    is_qkd: bool
    adapter: str
    distance_km: float | None = None
    qber: float | None = None
    leaked_bits: int | None = None
    epsilon_sec: float | None = None
    epsilon_cor: float | None = None
    pa_ratio: float | None = None
    simulated: bool = False
    produced_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    alarms: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for the database and the audit trail)."""
        return {
            "protocol": self.protocol,
            "is_qkd": self.is_qkd,
            "adapter": self.adapter,
            "simulated": self.simulated,
            "distance_km": self.distance_km,
            "qber": self.qber,
            "leaked_bits": self.leaked_bits,
            "epsilon_sec": self.epsilon_sec,
            "epsilon_cor": self.epsilon_cor,
            "pa_ratio": self.pa_ratio,
            "produced_at": self.produced_at.isoformat(),
            "alarms": list(self.alarms),
            "details": _jsonable(self.details),
        }


@dataclass(frozen=True, repr=False)
class KeyBlock:
    """Identical secret bits at both ends of a link, with a block ID and provenance.

    ``material`` holds ``bit_length`` bits, most significant bit of byte 0 first; bits past
    ``bit_length`` in the last byte are zero. The repr never shows material.
    """

    link_id: str
    block_id: str
    material: bytes
    bit_length: int
    provenance: Provenance
    # What the far end's adapter needs to obtain its copy of this block from its own device (an
    # upstream ETSI 014 device's key_IDs, say). Metadata only: travels to the peer KME in clear.
    sync: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bit_length <= 0:
            raise ValueError("a key block holds at least one bit")
        if len(self.material) != math.ceil(self.bit_length / 8):
            raise ValueError("material length does not match bit_length")
        if not self.block_id or not self.link_id:
            raise ValueError("a key block needs a link ID and a block ID")

    def __repr__(self) -> str:
        return (
            f"KeyBlock(link_id={self.link_id!r}, block_id={self.block_id!r}, "
            f"bit_length={self.bit_length}, protocol={self.provenance.protocol!r})"
        )


@dataclass(frozen=True)
class LinkAlarm:
    """A block that produced no key, or a link condition the KMS must act on."""

    link_id: str
    block_id: str | None
    reason: str
    severity: str = "critical"
    raised_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    details: Mapping[str, Any] = field(default_factory=dict)


LinkEvent = KeyBlock | LinkAlarm


@runtime_checkable
class KeySource(Protocol):
    """One end of a link as the KMS sees it.

    ``pull`` returns whatever the source has ready, at most ``max_events`` events, waiting at most
    ``timeout`` seconds for the first one (0 = do not wait). It returns an empty list when nothing
    is ready. Blocks come in the order the device produced them.
    """

    @property
    def link_id(self) -> str: ...

    def describe(self) -> Mapping[str, Any]:
        """What this source is (adapter, protocol, parameters), for status and provenance."""
        ...

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]: ...

    def close(self) -> None: ...


@runtime_checkable
class FollowerKeySource(Protocol):
    """The far end of a link whose device hands each block to the near end first.

    Devices that speak ETSI GS QKD 014 upstream deliver a key to one end (``enc_keys``) and let the
    other end fetch it by key_ID (``dec_keys``). The near end's KME announces each block to this KME
    over the KME-to-KME protocol with the block's ``sync`` metadata; ``fetch_announced`` then obtains
    this end's identical copy from this end's device. It raises ``KeySourceError`` when the device
    cannot deliver (down, unknown key_IDs) and returns a ``LinkAlarm`` when the copy it got does not
    match what was announced.
    """

    @property
    def link_id(self) -> str: ...

    def describe(self) -> Mapping[str, Any]: ...

    def fetch_announced(
        self, block_id: str, bit_length: int, sync: Mapping[str, Any]
    ) -> KeyBlock | LinkAlarm: ...

    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    """Turn numpy scalars, tuples and nested mappings into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value
