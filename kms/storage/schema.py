"""The database tables. Alembic migrations in ``migrations/`` create exactly these.

Key material columns only ever hold AES-GCM envelopes (``kms.crypto.envelope``); they are set to
NULL when material is zeroised, and the metadata row stays for provenance.

Why one module: every table hangs off one ``MetaData`` that the migrations' head is compared against
(tests/unit/test_store_integrity.py), and the models are declarations, no logic, read side by side.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT keys on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Link(Base):
    __tablename__ = "links"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    peer_kme_id: Mapped[str] = mapped_column(String(64), nullable=False)
    adapter: Mapped[str] = mapped_column(String(64), nullable=False)
    description: Mapped[dict[str, object]] = mapped_column(JSON, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="active")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class Sae(Base):
    __tablename__ = "saes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kme_id: Mapped[str] = mapped_column(String(64), nullable=False)
    cert_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="sae", server_default="sae")
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # The SAE lifecycle (migration 0013, DECISIONS.md D-29): active, suspended or revoked; ``enabled``
    # is kept equal to ``state = 'active'``. ``managed_by``: 'config' while qkms.toml is the record,
    # 'cli' once a ``qkms sae`` command changed the SAE (the configuration no longer overrides it).
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="active", server_default="active")
    managed_by: Mapped[str] = mapped_column(
        String(8), nullable=False, default="config", server_default="config"
    )
    state_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SaeCertificate(Base):
    """Every certificate pinned for an SAE by ``qkms sae``: the current one, the previous one during a
    rotation's grace period (accepted until ``valid_until``), and retired ones, for the record."""

    __tablename__ = "sae_certificates"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id"), nullable=False, index=True)
    subject: Mapped[str] = mapped_column(String(512), nullable=False)
    issuer: Mapped[str] = mapped_column(String(512), nullable=False)
    origin: Mapped[str] = mapped_column(String(16), nullable=False)  # site-ca or enterprise
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    state: Mapped[str] = mapped_column(String(8), nullable=False)  # current, grace or retired
    valid_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class RegistryVersion(Base):
    """One row: a number every SAE lifecycle change increments in its transaction, which each
    process compares with the version its in-memory registry reflects."""

    __tablename__ = "registry_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)


class KeyBlockRow(Base):
    """A storage block: up to ``pool.storage_block_bits`` bits of one adapter block.

    ``material`` holds only the bits from ``next_bit`` on: every cut re-seals the remainder, so bits
    already served never stay at rest in the pool.
    """

    __tablename__ = "key_blocks"
    __table_args__ = (
        UniqueConstraint("link_id", "source_block_id", "source_offset_bits", name="uq_key_blocks_source"),
        Index("ix_key_blocks_pool", "link_id", "state", "id"),
        Index(
            "ix_key_blocks_active_id",
            "id",
            postgresql_where=text("state = 'active'"),
            sqlite_where=text("state = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    link_id: Mapped[str] = mapped_column(ForeignKey("links.id"), nullable=False)
    source_block_id: Mapped[str] = mapped_column(String(128), nullable=False)
    source_offset_bits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bit_length: Mapped[int] = mapped_column(Integer, nullable=False)
    next_bit: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    material: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kek_id: Mapped[str] = mapped_column(String(64), nullable=False)
    provenance: Mapped[dict[str, object]] = mapped_column(JSON, nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # NULL: this KME cuts keys from the piece. Otherwise the peer KME that does; this KME holds a
    # mirror and records the ranges the peer's ledger takes (``taken``, JSON [[start, end], ...]).
    owner_kme_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    taken: Mapped[str | None] = mapped_column(Text, nullable=True)


class KeyRow(Base):
    """One delivered key: where its bits came from, who may fetch it, and its lifecycle state.

    The hot-path transitions are recorded on the row itself — reserved at ``created_at`` by the
    master, served to the named slave at ``served_at``, closed (consumed, expired, ...) at
    ``closed_at`` — and in the per-request audit record; rarer transitions (expiry, suspension,
    resumption) also get ``lifecycle_events`` rows.
    """

    __tablename__ = "keys"
    __table_args__ = (
        Index(
            "ix_keys_reserved_expiry",
            "expires_at",
            postgresql_where=text("state = 'reserved'"),
            sqlite_where=text("state = 'reserved'"),
        ),
        Index(
            "ix_keys_live_block",
            "block_id",
            postgresql_where=text("state IN ('reserved', 'suspended')"),
            sqlite_where=text("state IN ('reserved', 'suspended')"),
        ),
        # Consumed keys still holding material, by the end of their redelivery window (migration
        # 0010): what the expiry sweep zeroises and ``qkms db check`` inspects.
        Index(
            "ix_keys_redelivery",
            "expires_at",
            postgresql_where=text("state = 'consumed' AND material IS NOT NULL"),
            sqlite_where=text("state = 'consumed' AND material IS NOT NULL"),
        ),
    )

    # A run (key_count > 1, migration 0008): the keys one request cut from one block, stored as one
    # row under the first key_ID; member i's ID has i in its UUIDv7 counter bits, its bits start at
    # bit_offset + i * size_bits and its sealed material is the i-th equal slice of ``material``.
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_count: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    # The key_blocks row the bits were cut from. Not a declared foreign key: PostgreSQL checked it
    # with a trigger per key, a third of the cost of recording a request; blocks are never deleted,
    # and ``qkms db check`` (kms.storage.integrity) verifies the reference.
    block_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    bit_offset: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size_bits: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    master_sae_id: Mapped[str] = mapped_column(String(128), nullable=False)
    slave_sae_id: Mapped[str] = mapped_column(String(128), nullable=False)
    target_kme_id: Mapped[str] = mapped_column(String(64), nullable=False)
    policy: Mapped[str] = mapped_column(String(16), nullable=False)
    suite: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kem_exchange_id: Mapped[int | None] = mapped_column(ForeignKey("kem_exchanges.id"), nullable=True)
    material: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kek_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Reserved: the end of the TTL. Consumed: the end of the redelivery window, until which the
    # sealed material may be kept for a slave whose answer was lost (its consumption time if none).
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    multicast: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default="0")
    # The master's KME when it is another one (keys recorded from a peer's ledger), and for a relayed
    # key the KMEs and links it crossed.
    source_kme_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    route: Mapped[list[dict[str, object]] | None] = mapped_column(JSON, nullable=True)


class KemExchange(Base):
    """One ML-KEM encapsulation to the slave's KME, shared by the keys of one request."""

    __tablename__ = "kem_exchanges"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)
    target_kme_id: Mapped[str] = mapped_column(String(64), nullable=False)
    kem_key_version: Mapped[int] = mapped_column(Integer, nullable=False)
    public_key_sha384: Mapped[str] = mapped_column(String(96), nullable=False)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class KmeKey(Base):
    """The KME's own ML-DSA signing and ML-KEM key pairs, versioned; seeds sealed under the KEK."""

    __tablename__ = "kme_keys"
    __table_args__ = (UniqueConstraint("purpose", "version", name="uq_kme_keys_purpose_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    purpose: Mapped[str] = mapped_column(String(8), nullable=False)
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    public_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    sealed_seed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kek_id: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class KekVersion(Base):
    """A key-encryption key version (migration 0014, docs/DECISIONS.md D-27): where it is loaded from
    (``reference``, never the key itself), its public check value and its state: ``active`` (seals
    new records; exactly one), ``draining`` (a rotation re-seals its records away) or ``retired``."""

    __tablename__ = "kek_versions"

    kek_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    reference: Mapped[dict[str, object]] = mapped_column(JSON, nullable=False)
    check_value: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditRecordRow(Base):
    """An append-only, hash-chained audit record. ``data`` is canonical JSON text, hashed as stored."""

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(40), nullable=False)
    actor: Mapped[str] = mapped_column(String(160), nullable=False)
    action: Mapped[str] = mapped_column(String(40), nullable=False, index=True)
    subject: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    data: Mapped[str] = mapped_column(Text, nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(96), nullable=False)
    hash: Mapped[str] = mapped_column(String(96), nullable=False)


class AuditHead(Base):
    """The chain head: one row, locked by each append so records chain in commit order."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    hash: Mapped[str] = mapped_column(String(96), nullable=False)


class AuditCheckpoint(Base):
    """A signed checkpoint. Since migration 0009 they form a chain: ``number`` 1, 2, ... each signing
    ``prev_hash`` (the previous checkpoint's hash) and its range ``from_seq..upto_seq``. Rows from
    before 0009 keep NULL there (legacy, unchained)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    number: Mapped[int | None] = mapped_column(BigInteger, nullable=True, unique=True, index=True)
    prev_hash: Mapped[str | None] = mapped_column(String(96), nullable=True)
    from_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    upto_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    head_hash: Mapped[str] = mapped_column(String(96), nullable=False)
    kme_id: Mapped[str] = mapped_column(String(64), nullable=False)
    key_version: Mapped[int] = mapped_column(Integer, nullable=False)
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)
    at: Mapped[str] = mapped_column(String(40), nullable=False)
    signature: Mapped[str] = mapped_column(Text, nullable=False)


class AuditCountersignature(Base):
    """A peer KME's receipt: it holds a copy of this KME's checkpoint chain up to ``number``
    (``kms.audit.peer_copies``). The newest receipt per peer is what matters (the chain hashes back)."""

    __tablename__ = "audit_countersignatures"

    peer_kme_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    checkpoint_hash: Mapped[str] = mapped_column(String(96), nullable=False)
    key_version: Mapped[int] = mapped_column(Integer, nullable=False)
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)
    signature: Mapped[str] = mapped_column(Text, nullable=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class LinkStateRecord(Base):
    """The newest signed link-state record of each KME of the network (``kms.peer.link_state``),
    shared by every process of this KME; ``record`` is the signed document as received."""

    __tablename__ = "link_state_records"

    origin_kme_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    issued_at: Mapped[float] = mapped_column(Float, nullable=False)
    record: Mapped[str] = mapped_column(Text, nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class PeerMacKey(Base):
    """A MAC key a neighbour KME established with this one (``kms.service.peer_mac_keys``), sealed
    under the KEK; any process of this KME checks that neighbour's MACs with it."""

    __tablename__ = "peer_mac_keys"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)  # "<sender KME>/<key id>"
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    kek_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ConsoleAccount(Base):
    """An operator or auditor of the web console (``qkms operator add``, DECISIONS.md D-36). The
    password is kept only as a scrypt hash; ``failed_logins`` and ``locked_until`` carry the lockout."""

    __tablename__ = "console_accounts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)  # operator or auditor
    password_hash: Mapped[str] = mapped_column(String(256), nullable=False)
    failed_logins: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ConsoleSession(Base):
    """A signed-in console session, kept server side so every process of the KME knows it and a
    logout or account removal ends it. ``id`` is the SHA-256 of the cookie's token, never the token."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("console_accounts.name"), nullable=False, index=True)
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class KeyRecipient(Base):
    """An *additional* slave SAE entitled to a multicast key (the named slave is on the key row)."""

    __tablename__ = "key_recipients"

    key_id: Mapped[str] = mapped_column(ForeignKey("keys.key_id"), primary_key=True)
    sae_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LifecycleEvent(Base):
    """Every state transition of a key, block or link, with time and actor (docs/DECISIONS.md D-3)."""

    __tablename__ = "lifecycle_events"
    __table_args__ = (Index("ix_lifecycle_subject", "subject_kind", "subject_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject_kind: Mapped[str] = mapped_column(String(8), nullable=False)
    subject_id: Mapped[str] = mapped_column(String(160), nullable=False)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16), nullable=False)
    actor: Mapped[str] = mapped_column(String(160), nullable=False)
    reason: Mapped[str | None] = mapped_column(String(512), nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)


class PeerMessage(Base):
    """An accepted KME-to-KME message: a nonce or a (session, seq) seen twice is a replay."""

    __tablename__ = "peer_messages"
    __table_args__ = (
        UniqueConstraint("sender", "session", "seq", name="uq_peer_messages_sequence"),
        Index("ix_peer_messages_received_at", "received_at"),
    )

    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    session: Mapped[str] = mapped_column(String(64), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    msg_type: Mapped[str] = mapped_column(String(32), nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


links = cast(Table, Link.__table__)
saes = cast(Table, Sae.__table__)
sae_certificates = cast(Table, SaeCertificate.__table__)
registry_version = cast(Table, RegistryVersion.__table__)
key_blocks = cast(Table, KeyBlockRow.__table__)
keys = cast(Table, KeyRow.__table__)
key_recipients = cast(Table, KeyRecipient.__table__)
lifecycle_events = cast(Table, LifecycleEvent.__table__)
kem_exchanges = cast(Table, KemExchange.__table__)
kme_keys = cast(Table, KmeKey.__table__)
audit_records = cast(Table, AuditRecordRow.__table__)
audit_head = cast(Table, AuditHead.__table__)
audit_checkpoints = cast(Table, AuditCheckpoint.__table__)
audit_countersignatures = cast(Table, AuditCountersignature.__table__)
link_state_records = cast(Table, LinkStateRecord.__table__)
peer_mac_keys = cast(Table, PeerMacKey.__table__)
console_accounts = cast(Table, ConsoleAccount.__table__)
console_sessions = cast(Table, ConsoleSession.__table__)
peer_messages = cast(Table, PeerMessage.__table__)
kek_versions = cast(Table, KekVersion.__table__)
