"""The database tables. Alembic migrations in ``migrations/`` create exactly these.

Key material columns only ever hold AES-GCM envelopes (``kms.crypto.envelope``); they are set to
NULL when material is zeroised, and the metadata row stays for provenance.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
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
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class KeyBlockRow(Base):
    """A storage block: up to ``pool.storage_block_bits`` bits of one adapter block.

    ``material`` holds only the bits from ``next_bit`` on: every cut re-seals the remainder, so bits
    already served never stay at rest in the pool.
    """

    __tablename__ = "key_blocks"
    __table_args__ = (
        UniqueConstraint("link_id", "source_block_id", "source_offset_bits", name="uq_key_blocks_source"),
        Index("ix_key_blocks_pool", "link_id", "state", "id"),
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


class KeyRow(Base):
    """One delivered key: where its bits came from, who may fetch it, and its lifecycle state."""

    __tablename__ = "keys"
    __table_args__ = (Index("ix_keys_state_expires", "state", "expires_at"),)

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    block_id: Mapped[int] = mapped_column(ForeignKey("key_blocks.id"), nullable=False, index=True)
    bit_offset: Mapped[int] = mapped_column(Integer, nullable=False)
    size_bits: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    master_sae_id: Mapped[str] = mapped_column(String(128), nullable=False)
    slave_sae_id: Mapped[str] = mapped_column(String(128), nullable=False)
    target_kme_id: Mapped[str] = mapped_column(String(64), nullable=False)
    policy: Mapped[str] = mapped_column(String(16), nullable=False)
    material: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kek_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class KeyRecipient(Base):
    """A slave SAE entitled to one key (the named slave and every additional slave)."""

    __tablename__ = "key_recipients"

    key_id: Mapped[str] = mapped_column(ForeignKey("keys.key_id"), primary_key=True)
    sae_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LifecycleEvent(Base):
    """Every state transition of a key, block or link, with time and actor (DESIGN.md #3)."""

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


links = cast(Table, Link.__table__)
saes = cast(Table, Sae.__table__)
key_blocks = cast(Table, KeyBlockRow.__table__)
keys = cast(Table, KeyRow.__table__)
key_recipients = cast(Table, KeyRecipient.__table__)
lifecycle_events = cast(Table, LifecycleEvent.__table__)
