"""The KEK keyring as every KME process holds it (docs/DECISIONS.md D-27).

At start (:func:`open_keyring`) the process loads every version the database's keyring lists and
does not list as retired, each from its own reference, and checks each against its recorded check
value: a KEK that is not the recorded version, or does not load or unwrap, stops the start with one
line. On a database whose keyring is still empty (first start, or one made before migration 0014)
the configured KEK becomes the first version, after proving that it opens what is stored under that
name. Afterwards :func:`sync` runs every ``kek.refresh_seconds`` before a seal (and at once when a
record names a version the process lacks), so a rotation started by ``qkms kek rotate`` reaches
every ``--workers`` process and every process on the same PostgreSQL without a restart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError, IntegrityError

from kms.config import KekSection, KmsSettings
from kms.crypto import kek_sources
from kms.crypto.envelope import Envelope, KekError, MaterialIntegrityError, kek_check_value
from kms.crypto.identity import seed_aad
from kms.storage import kek_repository as repo
from kms.storage.database import Database
from kms.storage.peer_mac_repository import mac_key_aad
from kms.storage.pool_repository import block_aad, key_aad

log = structlog.get_logger(__name__)

ACTIVE, DRAINING, DRAINED, RETIRED = "active", "draining", "drained", "retired"


def configured_reference(cfg: KekSection) -> kek_sources.Reference:
    """The reference of the KEK the configuration names (the keyring's first version)."""
    if cfg.pkcs11 is not None:
        return kek_sources.pkcs11_reference(cfg.pkcs11.model_dump())
    if cfg.file is not None:
        return kek_sources.file_reference(cfg.file)
    return kek_sources.env_reference(cfg.env_var or "")


def open_keyring(settings: KmsSettings, db: Database) -> Envelope:
    """The process's envelope: every live version loaded and checked, the active one sealing."""
    with db.read() as conn:
        if not repo.keyring_exists(conn):  # a database before migration 0014: the configured KEK only
            return Envelope(kek_sources.load(configured_reference(settings.kek)), settings.kek.key_id)
        rows = repo.versions(conn)
    if not rows:
        rows = _bootstrap(settings, db)
    live = [r for r in rows if r.state != RETIRED]
    active = [r for r in live if r.state == ACTIVE]
    if len(active) != 1:
        raise KekError(f"the KEK keyring has {len(active)} active versions; exactly one is required")
    envelope = Envelope(_load_checked(active[0]), active[0].kek_id)
    for row in live:
        if row.kek_id != active[0].kek_id:
            envelope.add_version(row.kek_id, _load_checked(row))
    envelope.attach_sync(lambda env: sync(env, db), settings.kek.refresh_seconds)
    return envelope


def sync(envelope: Envelope, db: Database) -> None:
    """Bring ``envelope`` in line with the keyring: load new versions, switch the sealing version,
    drop retired ones. A version that cannot be loaded here is logged (without secrets) and skipped:
    records sealed under it fail to open in this process until it can."""
    try:
        with db.read() as conn:
            rows = repo.versions(conn)
    except DBAPIError as exc:
        log.warning("kek_keyring_unreadable", error=type(exc).__name__)
        return
    for row in rows:
        if row.state == RETIRED:
            envelope.forget(row.kek_id)
        elif row.kek_id not in envelope.versions:
            try:
                envelope.add_version(row.kek_id, _load_checked(row))
                log.info("kek_version_loaded", kek_id=row.kek_id)
            except KekError as exc:
                log.error("kek_version_unavailable", kek_id=row.kek_id, reason=str(exc))
    active = next((r.kek_id for r in rows if r.state == ACTIVE), None)
    if active is not None and active in envelope.versions and envelope.kek_id != active:
        envelope.set_write(active)
        log.info("kek_write_version", kek_id=active)


def load_version(row: repo.VersionRow) -> bytes:
    return _load_checked(row)


def _load_checked(row: repo.VersionRow) -> bytes:
    kek = kek_sources.load(row.reference)
    if kek_check_value(kek) != row.check_value:
        raise KekError(
            f"the KEK loaded from {kek_sources.describe(row.reference)} is not KEK version {row.kek_id}"
            " (its check value differs): wrong key"
        )
    return kek


def _bootstrap(settings: KmsSettings, db: Database) -> list[repo.VersionRow]:
    """Record the configured KEK as the first version, once it has proven it opens the store."""
    ref = configured_reference(settings.kek)
    kek = kek_sources.load(ref)
    kek_id = settings.kek.key_id
    try:
        with db.write() as conn:
            if not repo.versions(conn):  # another process may have been first
                sample = repo.any_sealed_sample(conn, kek_id)
                if sample is not None and not opens_sample(Envelope(kek, kek_id), sample):
                    raise KekError(
                        f"the KEK from {kek_sources.describe(ref)} does not open the material stored"
                        f" under {kek_id}: wrong key"
                    )
                repo.insert_version(conn, kek_id, ref, kek_check_value(kek), ACTIVE, datetime.now(UTC))
    except IntegrityError:
        pass  # PostgreSQL: another process of this KME (--workers) recorded it at the same moment
    with db.read() as conn:
        return repo.versions(conn)


def opens_sample(envelope: Envelope, sample: tuple[str, tuple[Any, ...]]) -> bool:
    """Whether ``envelope`` opens one sealed row (as :func:`kek_repository.any_sealed_sample` gives it)."""
    table, row = sample
    try:
        for sealed, aad in record_parts(table, row):
            envelope.open(sealed, aad)
    except MaterialIntegrityError:
        return False
    return True


def record_parts(table: str, row: tuple[Any, ...]) -> list[tuple[bytes, bytes]]:
    """The separately sealed parts of a row and their associated data (a run holds one per key)."""
    if table == "key_blocks":
        _id, link_id, source, offset, next_bit, material, _kek = row
        return [(bytes(material), block_aad(link_id, source, offset, next_bit))]
    if table == "kme_keys":
        _id, purpose, version, sealed, _kek = row
        return [(bytes(sealed), seed_aad(purpose, version))]
    if table == "peer_mac_keys":
        row_id, sealed, _kek = row
        return [(bytes(sealed), mac_key_aad(row_id))]
    from kms.domain.key_ids import run_member

    key_id, count, material, _kek = row
    step = len(material) // count
    return [
        (
            bytes(material[i * step : (i + 1) * step]),
            key_aad(key_id if count == 1 else run_member(key_id, i)),
        )
        for i in range(count)
    ]
