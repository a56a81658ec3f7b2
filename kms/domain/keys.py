"""What the key pool holds, as plain values: cut keys, stored keys, KEM exchanges, storage pieces.

These are domain types so that the delivery rules (``kms.domain.delivery``) can judge a key without
knowing how it is stored; ``kms.storage.pool_repository`` builds and reads them (storage depends on
the domain, never the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


# Not frozen: made per key on the delivery hot path, where a frozen dataclass's __init__ cost
# ~8x a slotted one's (1.6 against 0.2 us for a StoredKey). Treat instances as read-only.
@dataclass(repr=False, slots=True)
class CutKey:
    """A key cut from the pool (or, for a PQC-fallback key, no pool bits: block_id None)."""

    key_id: str
    material: bytes | None
    block_id: int | None = None
    bit_offset: int | None = None
    # Where the bits sit in the adapter block both ends of the link hold (for the peer's ledger).
    link_id: str | None = None
    source_block_id: str | None = None
    source_bit: int | None = None


@dataclass(repr=False, slots=True)
class StoredKey:
    """One key as Get key with key IDs finds it (a member of a run is expanded to its own record)."""

    key_id: str
    master_sae_id: str
    slave_sae_id: str
    target_kme_id: str
    state: str
    policy: str
    suite: str | None
    kem_exchange_id: int | None
    size_bits: int
    expires_at: datetime
    material: bytes | None
    recipients: dict[str, datetime | None]  # the named slave first, then any additional slaves
    source_kme_id: str | None = None  # the master's KME, when it is another one
    row_id: str = ""  # the keys row holding it: its own key_ID, or its run's first
    row_count: int = 1  # keys in that row


@dataclass(frozen=True)
class StoredExchange:
    """A recorded ML-KEM encapsulation: what the slave's KME needs to decapsulate it again."""

    algorithm: str
    kem_key_version: int
    ciphertext: bytes


@dataclass(frozen=True, repr=False)
class StoragePiece:
    """A byte-aligned piece of an adapter block, stored as one pool block."""

    source_block_id: str
    source_offset_bits: int
    material: bytes
    owner_kme_id: str | None = None  # None: this KME cuts it; else the peer KME that does
