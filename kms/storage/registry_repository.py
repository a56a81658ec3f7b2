"""SQL for the registries: SAEs (their lifecycle and pinned certificates) and links.

The configuration's SAEs are written at start-up (:func:`upsert_saes`); once a ``qkms sae`` command
has changed an SAE (``managed_by = 'cli'``) the database is its only record. Every change bumps
``registry_version`` in the same transaction (:func:`bump_version`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from kms.domain.lifecycle import KeyState
from kms.domain.saes import GraceCertificate, PinnedCertificate, SaeInfo, SaeState
from kms.storage.pool_repository import EventBatch, members
from kms.storage.schema import key_recipients, keys, links, registry_version, sae_certificates, saes


@dataclass(frozen=True)
class SaeRecord:
    """One registered SAE as ``qkms sae list`` shows it."""

    sae_id: str
    kme_id: str
    role: str
    state: SaeState
    fingerprint: str
    managed_by: str
    reason: str | None
    updated_at: datetime | None


@dataclass(frozen=True)
class CertificateRecord:
    sae_id: str
    certificate: PinnedCertificate
    state: str  # current, grace or retired
    valid_until: datetime | None


def upsert_saes(conn: Connection, entries: Sequence[SaeInfo]) -> None:
    """Insert or update the configured SAEs; SAEs a ``qkms sae`` command manages are left alone."""
    now = datetime.now(UTC)
    for e in entries:
        existing = conn.execute(select(saes.c.managed_by).where(saes.c.id == e.sae_id)).first()
        state = SaeState.ACTIVE.value if e.enabled else SaeState.SUSPENDED.value
        values = {
            "kme_id": e.kme_id,
            "cert_fingerprint": e.fingerprint,
            "enabled": e.enabled,
            "role": e.role,
            "state": state,
        }
        if existing is None:
            conn.execute(saes.insert().values(id=e.sae_id, created_at=now, managed_by="config", **values))
        elif existing.managed_by == "config":
            conn.execute(update(saes).where(saes.c.id == e.sae_id).values(**values))
    bump_version(conn)


def load_saes(conn: Connection) -> list[SaeInfo]:
    return [
        SaeInfo(r.id, r.kme_id, r.cert_fingerprint, bool(r.enabled), r.role, r.state)
        for r in conn.execute(
            select(
                saes.c.id, saes.c.kme_id, saes.c.cert_fingerprint, saes.c.enabled, saes.c.role, saes.c.state
            )
        )
    ]


def load_grace(conn: Connection, now: datetime) -> list[GraceCertificate]:
    """Previous certificates still inside their rotation's grace period."""
    rows = conn.execute(
        select(
            sae_certificates.c.fingerprint, sae_certificates.c.sae_id, sae_certificates.c.valid_until
        ).where(sae_certificates.c.state == "grace", sae_certificates.c.valid_until > now)
    )
    return [GraceCertificate(r.fingerprint, r.sae_id, _aware(r.valid_until).timestamp()) for r in rows]


def registry_version_of(conn: Connection) -> int:
    row = conn.execute(select(registry_version.c.version).where(registry_version.c.id == 1)).first()
    return int(row.version) if row else 0


def bump_version(conn: Connection) -> None:
    """Tell every serving process the registry changed (they compare this number, D-29)."""
    done = conn.execute(
        update(registry_version)
        .where(registry_version.c.id == 1)
        .values(version=registry_version.c.version + 1)
    )
    if done.rowcount == 0:
        conn.execute(registry_version.insert().values(id=1, version=1))


def sae_record(conn: Connection, sae_id: str, lock: bool = False) -> SaeRecord | None:
    query = select(saes).where(saes.c.id == sae_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    return None if row is None else _record(row)


def sae_records(conn: Connection) -> list[SaeRecord]:
    return [_record(r) for r in conn.execute(select(saes).order_by(saes.c.role, saes.c.id))]


def _record(row: Any) -> SaeRecord:
    return SaeRecord(
        row.id,
        row.kme_id,
        row.role,
        SaeState(row.state),
        row.cert_fingerprint,
        row.managed_by,
        row.state_reason,
        row.updated_at,
    )


def certificate_records(conn: Connection, sae_id: str | None = None) -> list[CertificateRecord]:
    query = select(sae_certificates).order_by(sae_certificates.c.sae_id, sae_certificates.c.added_at)
    if sae_id is not None:
        query = query.where(sae_certificates.c.sae_id == sae_id)
    return [
        CertificateRecord(
            r.sae_id,
            PinnedCertificate(r.fingerprint, r.subject, r.issuer, r.origin, _aware(r.not_after)),
            r.state,
            None if r.valid_until is None else _aware(r.valid_until),
        )
        for r in conn.execute(query)
    ]


def fingerprint_owner(conn: Connection, fingerprint: str) -> str | None:
    """The entity that has (or had) this certificate pinned, if any."""
    row = conn.execute(select(saes.c.id).where(saes.c.cert_fingerprint == fingerprint)).first()
    if row is None:
        row = conn.execute(
            select(sae_certificates.c.sae_id).where(sae_certificates.c.fingerprint == fingerprint)
        ).first()
        return None if row is None else str(row.sae_id)
    return str(row.id)


def insert_sae(conn: Connection, sae_id: str, kme_id: str, cert: PinnedCertificate, now: datetime) -> None:
    conn.execute(
        saes.insert().values(
            id=sae_id,
            kme_id=kme_id,
            cert_fingerprint=cert.fingerprint,
            role="sae",
            enabled=True,
            state=SaeState.ACTIVE.value,
            managed_by="cli",
            created_at=now,
            updated_at=now,
        )
    )
    add_certificate(conn, sae_id, cert, now)


def set_state(conn: Connection, sae_id: str, state: SaeState, reason: str, now: datetime) -> None:
    conn.execute(
        update(saes)
        .where(saes.c.id == sae_id)
        .values(
            state=state.value,
            enabled=state is SaeState.ACTIVE,
            state_reason=reason[:512],
            managed_by="cli",
            updated_at=now,
        )
    )


def remote_state(conn: Connection, sae_id: str) -> tuple[SaeState, datetime | None] | None:
    """The state a peer KME last told this one for its SAE ``sae_id`` (DECISIONS.md D-39), locked."""
    row = conn.execute(
        select(saes.c.state, saes.c.updated_at)
        .where(saes.c.id == sae_id, saes.c.managed_by == "peer")
        .with_for_update()
    ).first()
    return (
        None
        if row is None
        else (SaeState(row.state), None if row.updated_at is None else _aware(row.updated_at))
    )


def set_remote_state(
    conn: Connection,
    sae_id: str,
    kme_id: str,
    fingerprint: str,
    state: SaeState,
    reason: str,
    changed_at: datetime,
) -> None:
    """Record the state of another KME's SAE as that KME told it (``managed_by = 'peer'``); the row's
    ``updated_at`` is the home KME's time of the change, so an older notice never overrides a newer."""
    values = {
        "state": state.value,
        "enabled": state is SaeState.ACTIVE,
        "state_reason": reason[:512],
        "updated_at": changed_at,
    }
    done = conn.execute(update(saes).where(saes.c.id == sae_id, saes.c.managed_by == "peer").values(**values))
    if done.rowcount == 0:
        conn.execute(
            saes.insert().values(
                id=sae_id,
                kme_id=kme_id,
                cert_fingerprint=fingerprint,
                role="sae",
                managed_by="peer",
                created_at=changed_at,
                **values,
            )
        )


def add_certificate(conn: Connection, sae_id: str, cert: PinnedCertificate, now: datetime) -> None:
    conn.execute(
        sae_certificates.insert().values(
            fingerprint=cert.fingerprint,
            sae_id=sae_id,
            subject=cert.subject[:512],
            issuer=cert.issuer[:512],
            origin=cert.origin,
            not_after=cert.not_after,
            state="current",
            added_at=now,
        )
    )


def replace_certificate(
    conn: Connection,
    sae_id: str,
    old_fingerprint: str,
    cert: PinnedCertificate,
    grace_until: datetime,
    now: datetime,
) -> None:
    """Pin ``cert`` as the SAE's certificate; the old one is accepted until ``grace_until`` (its
    registry row is created if the old certificate came from the configuration). Earlier grace
    certificates are retired: at most one previous certificate is ever accepted."""
    conn.execute(
        update(sae_certificates)
        .where(sae_certificates.c.sae_id == sae_id, sae_certificates.c.state == "grace")
        .values(state="retired", valid_until=now)
    )
    in_grace = grace_until > now
    done = conn.execute(
        update(sae_certificates)
        .where(sae_certificates.c.fingerprint == old_fingerprint)
        .values(state="grace" if in_grace else "retired", valid_until=grace_until if in_grace else now)
    )
    if done.rowcount == 0:
        conn.execute(
            sae_certificates.insert().values(
                fingerprint=old_fingerprint,
                sae_id=sae_id,
                subject=f"CN={sae_id}",
                issuer="(from the configuration)",
                origin="config",
                not_after=grace_until,
                state="grace" if in_grace else "retired",
                valid_until=grace_until if in_grace else now,
                added_at=now,
            )
        )
    add_certificate(conn, sae_id, cert, now)
    conn.execute(
        update(saes)
        .where(saes.c.id == sae_id)
        .values(cert_fingerprint=cert.fingerprint, managed_by="cli", updated_at=now)
    )


def end_grace(conn: Connection, sae_id: str, now: datetime) -> None:
    """A revoked SAE keeps no second certificate."""
    conn.execute(
        update(sae_certificates)
        .where(sae_certificates.c.sae_id == sae_id, sae_certificates.c.state == "grace")
        .values(state="retired", valid_until=now)
    )


_LIVE = (KeyState.RESERVED.value, KeyState.SUSPENDED.value)
# Literal predicates, the WHERE clauses of the partial indexes ix_keys_live_block and
# ix_keys_redelivery, so that SQLite reads only live keys rather than the whole key history.
_LIVE_ROWS = text("keys.state IN ('reserved', 'suspended')")
_HELD_CONSUMED = text("keys.state = 'consumed' AND keys.material IS NOT NULL")


def destroy_keys_of(conn: Connection, sae_id: str, now: datetime, actor: str, reason: str) -> tuple[int, int]:
    """Destroy every key not yet fetched that ``sae_id`` requested or may fetch (master, slave or a
    multicast recipient), and zeroise the material consumed keys of it keep for redelivery.
    Returns (keys destroyed, consumed keys zeroised); each destroyed key gets a lifecycle event."""
    involved = or_(
        keys.c.master_sae_id == sae_id,
        keys.c.slave_sae_id == sae_id,
        keys.c.key_id.in_(select(key_recipients.c.key_id).where(key_recipients.c.sae_id == sae_id)),
    )
    rows = conn.execute(
        select(keys.c.key_id, keys.c.key_count, keys.c.state)
        .where(keys.c.state.in_(_LIVE), involved)
        .with_for_update()
    ).all()
    events = EventBatch(now)
    for state in _LIVE:
        batch = [(r.key_id, r.key_count) for r in rows if r.state == state]
        for key_id in members(batch):
            events.add("key", key_id, KeyState(state), KeyState.DESTROYED, actor, reason[:512])
    if rows:
        conn.execute(
            update(keys)
            .where(keys.c.key_id.in_([r.key_id for r in rows]), _LIVE_ROWS)
            .values(state=KeyState.DESTROYED.value, material=None, closed_at=now)
        )
    destroyed = len(events.rows)
    events.flush(conn)
    held = conn.execute(update(keys).where(_HELD_CONSUMED, involved).values(material=None))
    return destroyed, int(held.rowcount or 0)


def _aware(at: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def upsert_link(
    conn: Connection, link_id: str, peer_kme_id: str, adapter: str, description: Mapping[str, Any]
) -> None:
    now = datetime.now(UTC)
    values = {
        "peer_kme_id": peer_kme_id,
        "adapter": adapter,
        "description": dict(description),
        "updated_at": now,
    }
    stmt: Any
    if conn.dialect.name == "postgresql":
        stmt = postgresql.insert(links).values(id=link_id, state="active", created_at=now, **values)
    else:
        stmt = sqlite.insert(links).values(id=link_id, state="active", created_at=now, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[links.c.id], set_=values))
