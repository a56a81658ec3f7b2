"""The SAE lifecycle as use cases (``qkms sae``, DECISIONS.md D-29): add, rotate, suspend, resume, revoke.

Each is one transaction: the SAE's current state is read under a row lock and checked against the
domain's transitions, the change is made, ``registry_version`` is incremented (so every serving
process reloads its registry within ``sae_registry.refresh_ms``) and the change is audited through
the audit recorder. Revocation also destroys the keys the SAE could still fetch or had requested.
Every refusal is a :class:`SaeLifecycleError` with a one-line message, raised before anything is
written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from kms.domain.saes import PinnedCertificate, SaeState, sae_id_refusal, sae_transition_refusal
from kms.service import audit_recorder
from kms.storage import registry_repository as registry
from kms.storage.database import Database
from kms.storage.registry_repository import CertificateRecord, SaeRecord

OPERATOR = "operator"


class SaeLifecycleError(Exception):
    """The change cannot be made as asked; the message says why in one line. Nothing was changed."""


@dataclass(frozen=True)
class SaeChange:
    sae_id: str
    state: SaeState
    fingerprint: str
    keys_destroyed: int = 0
    redelivery_zeroised: int = 0


def check_new_sae(db: Database, sae_id: str) -> None:
    """Refuse an ID that is malformed or already registered (before a certificate is issued for it)."""
    refusal = sae_id_refusal(sae_id)
    if refusal:
        raise SaeLifecycleError(refusal)
    with db.read() as conn:
        existing = registry.sae_record(conn, sae_id)
    if existing is not None:
        raise SaeLifecycleError(_exists(existing))


def _exists(existing: SaeRecord) -> str:
    if existing.state is SaeState.REVOKED:
        return f"SAE {existing.sae_id!r} was revoked; a revoked SAE ID is never registered again"
    return f"{existing.role} {existing.sae_id!r} is already registered"


def add(db: Database, kme_id: str, sae_id: str, cert: PinnedCertificate) -> SaeChange:
    """Register a new SAE of this KME with its pinned certificate."""
    refusal = sae_id_refusal(sae_id)
    if refusal:
        raise SaeLifecycleError(refusal)
    now = datetime.now(UTC)
    with db.write() as conn:
        existing = registry.sae_record(conn, sae_id, lock=True)
        if existing is not None:
            raise SaeLifecycleError(_exists(existing))
        _check_unpinned(conn, cert)
        registry.insert_sae(conn, sae_id, kme_id, cert, now)
        registry.bump_version(conn)
        audit_recorder.record(conn, OPERATOR, "sae.added", sae_id, _cert_data(cert), now)
    return SaeChange(sae_id, SaeState.ACTIVE, cert.fingerprint)


def rotate(db: Database, kme_id: str, sae_id: str, cert: PinnedCertificate, grace: timedelta) -> SaeChange:
    """Pin a new certificate; the previous one stays accepted for ``grace``."""
    now = datetime.now(UTC)
    with db.write() as conn:
        current = _local_sae(conn, kme_id, sae_id)
        if current.state is SaeState.REVOKED:
            raise SaeLifecycleError(f"SAE {sae_id!r} is revoked; a revoked SAE cannot be given a certificate")
        _check_unpinned(conn, cert)
        until = now + grace
        registry.replace_certificate(conn, sae_id, current.fingerprint, cert, until, now)
        registry.bump_version(conn)
        data = {
            **_cert_data(cert),
            "previous_fingerprint": current.fingerprint,
            "grace_until": until.isoformat(),
        }
        audit_recorder.record(conn, OPERATOR, "sae.rotated", sae_id, data, now)
    return SaeChange(sae_id, current.state, cert.fingerprint)


def suspend(db: Database, kme_id: str, sae_id: str, reason: str) -> SaeChange:
    """Refuse the SAE's requests until it is resumed; its keys are kept (they expire by their TTL)."""
    return _transition(db, kme_id, sae_id, SaeState.SUSPENDED, "sae.suspended", reason)


def resume(db: Database, kme_id: str, sae_id: str, reason: str) -> SaeChange:
    return _transition(db, kme_id, sae_id, SaeState.ACTIVE, "sae.resumed", reason)


def revoke(db: Database, kme_id: str, sae_id: str, reason: str) -> SaeChange:
    """Refuse the SAE for good and destroy every key it requested or may fetch that is not yet fetched."""
    return _transition(db, kme_id, sae_id, SaeState.REVOKED, "sae.revoked", reason)


def sweep_revoked(db: Database, kme_id: str, sae_id: str) -> SaeChange:
    """Destroy keys a request authenticated before the revocation reached its process reserved
    after the revocation's transaction (run once the propagation interval has passed)."""
    now = datetime.now(UTC)
    with db.write() as conn:
        current = _local_sae(conn, kme_id, sae_id)
        if current.state is not SaeState.REVOKED:
            raise SaeLifecycleError(f"SAE {sae_id!r} is not revoked")
        destroyed, zeroised = registry.destroy_keys_of(conn, sae_id, now, OPERATOR, f"SAE {sae_id} revoked")
        if destroyed or zeroised:
            data = {"keys_destroyed": destroyed, "redelivery_zeroised": zeroised}
            audit_recorder.record(conn, OPERATOR, "sae.revoked_sweep", sae_id, data, now)
    return SaeChange(sae_id, SaeState.REVOKED, current.fingerprint, destroyed, zeroised)


def _transition(
    db: Database, kme_id: str, sae_id: str, target: SaeState, action: str, reason: str
) -> SaeChange:
    now = datetime.now(UTC)
    with db.write() as conn:
        current = _local_sae(conn, kme_id, sae_id)
        refusal = sae_transition_refusal(current.state, target)
        if refusal:
            raise SaeLifecycleError(f"SAE {sae_id!r} {refusal}")
        registry.set_state(conn, sae_id, target, reason, now)
        destroyed = zeroised = 0
        if target is SaeState.REVOKED:
            registry.end_grace(conn, sae_id, now)
            destroyed, zeroised = registry.destroy_keys_of(
                conn, sae_id, now, OPERATOR, f"SAE {sae_id} revoked"
            )
        registry.bump_version(conn)
        data: dict[str, Any] = {"reason": reason, "from": current.state.value}
        if target is SaeState.REVOKED:
            data |= {"keys_destroyed": destroyed, "redelivery_zeroised": zeroised}
        audit_recorder.record(conn, OPERATOR, action, sae_id, data, now)
    return SaeChange(sae_id, target, current.fingerprint, destroyed, zeroised)


def _local_sae(conn: Connection, kme_id: str, sae_id: str) -> SaeRecord:
    """The SAE, locked; refused if unknown, not an SAE, or served by another KME."""
    record = registry.sae_record(conn, sae_id, lock=True)
    if record is None or record.role != "sae":
        raise SaeLifecycleError(f"no SAE {sae_id!r} is registered at this KME")
    if record.kme_id != kme_id:
        raise SaeLifecycleError(f"SAE {sae_id!r} is served by KME {record.kme_id}, not this one")
    return record


def _check_unpinned(conn: Connection, cert: PinnedCertificate) -> None:
    owner = registry.fingerprint_owner(conn, cert.fingerprint)
    if owner is not None:
        raise SaeLifecycleError(
            f"this certificate is already pinned for {owner!r}; each certificate names one entity"
        )


def _cert_data(cert: PinnedCertificate) -> dict[str, str]:
    return {
        "fingerprint": cert.fingerprint,
        "subject": cert.subject,
        "issuer": cert.issuer,
        "origin": cert.origin,
        "not_after": cert.not_after.isoformat(),
    }


def listing(db: Database) -> tuple[list[SaeRecord], list[CertificateRecord]]:
    """Every registered entity and every certificate ``qkms sae`` pinned (for ``qkms sae list``)."""
    with db.read() as conn:
        return registry.sae_records(conn), registry.certificate_records(conn)
