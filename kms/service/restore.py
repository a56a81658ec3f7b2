"""``qkms restore``: put a backup back so that it can never serve a key twice (docs/DECISIONS.md D-28).

Order, each step refusing with one line and leaving everything as it was: the file is a backup of
*this* KME and of this backend; no KME is running on the store (its port answers, the SQLite
leader lock is held, or other sessions use the PostgreSQL database); the manifest authenticates
under the backup's KEK and every member matches its digest. The snapshot is then loaded into a
*staging* store beside the live one, migrated, and must pass ``db check`` and ``audit verify``
(against the anchors it should match: the anchored history up to its last checkpoint). Then, still in
staging and in one transaction, it is **fenced**: every key and pool bit the snapshot holds is
marked unusable (``kms.storage.fence_repository``) and the restore is audited with the counts and with
what history the restore gave up (``backup.restored``). Only then does the staging store replace the
live one (the old one is kept beside it), the anchor file is cut back to the restored history (the
old file kept as evidence), and the new records are signed and anchored.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kms.audit.anchors import Anchor, AnchorFile, AnchorFileError
from kms.audit.integrity import AuditIntegrityError
from kms.config import KmsSettings
from kms.crypto import kek_sources
from kms.crypto.envelope import Envelope, KekError
from kms.crypto.identity import KmeIdentity
from kms.crypto.pqc.registry import get_kem_provider, get_signature_provider
from kms.domain.audit_chain import Checkpoint
from kms.service import audit_recorder, backup_archive
from kms.service.audit_checkpoints import CheckpointWriter, anchor_file, tail_window
from kms.service.audit_queries import AuditService
from kms.service.backup import backend_of
from kms.service.identity_keys import IdentityKeys
from kms.service.kek_keyring import configured_reference, load_version, open_keyring
from kms.storage import audit_repository, fence_repository, kek_repository, migrate, snapshot
from kms.storage.database import Database
from kms.storage.integrity import IntegrityCheck, run_checks


class RestoreError(RuntimeError):
    """The restore is refused or failed before the live store changed; the message is one line."""


@dataclass
class RestoreReport:
    fenced: fence_repository.FenceCounts
    snapshot_seq: int
    lost_checkpoints: tuple[int, int] | None
    kept_store: str
    kept_anchors: str | None
    checks: list[IntegrityCheck]
    audit_ok: bool
    problems: list[str]


def restore(settings: KmsSettings, path: Path, actor: str = "operator") -> RestoreReport:
    archive = backup_archive.read(path)
    manifest = archive.manifest
    if manifest.get("kme_id") != settings.kme.id:
        raise RestoreError(
            f"{path} is a backup of KME {manifest.get('kme_id')!r}, not of this KME {settings.kme.id!r}"
        )
    url = settings.database.url
    backend = backend_of(url)
    if manifest.get("backend") != backend:
        raise RestoreError(f"{path} holds a {manifest.get('backend')} database; this KME uses {backend}")
    refuse_if_running(settings)
    _verify_mac(settings, archive)
    backup_archive.verify_members(archive)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    staged_url, cleanup = _stage(archive, url, backend)
    try:
        fenced, seq, lost, prefix = _check_and_fence(settings, staged_url, path, stamp, actor)
    except BaseException:
        cleanup()
        raise
    kept_store = _install(url, backend, staged_url, stamp)
    kept_anchors = _cut_anchors(settings, prefix, stamp)
    try:  # the fenced store is in place: whatever fails now is reported, not raised
        checks, audit_ok, problems = _sign_and_check(settings)
    except (AuditIntegrityError, KekError) as exc:
        checks, audit_ok, problems = [], False, [str(exc)]
    return RestoreReport(fenced, seq, lost, kept_store, kept_anchors, checks, audit_ok, problems)


def refuse_if_running(settings: KmsSettings) -> None:
    """One line if a KME is (or may be) serving from this store."""
    host = "127.0.0.1" if ipaddress.ip_address(settings.kme.host).is_unspecified else settings.kme.host
    with contextlib.suppress(OSError), socket.create_connection((host, settings.kme.port), timeout=0.5):
        raise RestoreError(f"a KME is listening on {host}:{settings.kme.port}; stop it before restoring")
    url = settings.database.url
    if backend_of(url) == "sqlite":
        if snapshot.sqlite_in_use(url):
            raise RestoreError("a KME process holds this SQLite store; stop it before restoring")
        return
    try:
        others = snapshot.pg_sessions(url)
    except Exception as exc:  # the live database may be gone: nothing runs on it then
        if "does not exist" in str(exc):
            return
        raise RestoreError(f"cannot reach the PostgreSQL database: {type(exc).__name__}") from exc
    if others:
        raise RestoreError(
            f"{others} other sessions use the PostgreSQL database; stop every KME process first"
        )


def _verify_mac(settings: KmsSettings, archive: backup_archive.Archive) -> None:
    """The manifest must authenticate under a KEK this KME already trusts: its configured ``[kek]`` or
    a live version of its current keyring, each loaded from the *local* reference. The references
    written in the backup are never used for this (a forger would name a KEK of his own)."""
    for kek_id, kek in _trusted_keks(settings):
        mac = Envelope(kek, kek_id).mac(archive.manifest_raw, kek_id)
        if hmac.compare_digest(mac, archive.mac):
            return
    raise backup_archive.BackupFileError(
        f"{archive.path} was tampered with, or is sealed under a KEK this KME does not hold"
        " (neither [kek] nor a live version of its keyring): its manifest does not authenticate"
    )


def _trusted_keks(settings: KmsSettings) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    with contextlib.suppress(KekError):
        out.append((settings.kek.key_id, kek_sources.load(configured_reference(settings.kek))))
    url = settings.database.url
    if backend_of(url) == "sqlite" and not snapshot.sqlite_path(url).exists():
        return out  # no store here (a new host): do not create one by looking
    db = Database(url, pool_size=1)
    try:
        with db.read() as conn:
            rows = kek_repository.versions(conn)
    except Exception:  # no store, no keyring table, or the database is gone: nothing more to trust
        rows = []
    finally:
        db.dispose()
    for row in rows:
        if row.state != "retired":
            with contextlib.suppress(KekError):
                out.append((row.kek_id, load_version(row)))
    return out


def _stage(archive: backup_archive.Archive, url: str, backend: str) -> tuple[str, Callable[[], None]]:
    member = backup_archive.DATABASE[backend]
    if backend == "sqlite":
        live = snapshot.sqlite_path(url)
        staged = live.with_name(f"{live.name}.restoring")
        for stale in (staged, Path(f"{staged}-wal"), Path(f"{staged}-shm")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        backup_archive.extract(archive, member, staged)

        def drop_file() -> None:
            for stale in (staged, Path(f"{staged}-wal"), Path(f"{staged}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

        return f"sqlite:///{staged}", drop_file
    with tempfile.TemporaryDirectory(prefix=".qkms-restore-") as tmp:
        dump = Path(tmp) / member
        backup_archive.extract(archive, member, dump)
        staged_url = snapshot.pg_load_staging(url, dump)
    return staged_url, lambda: snapshot.pg_drop_staging(url)


def _check_and_fence(
    settings: KmsSettings, staged_url: str, path: Path, stamp: str, actor: str
) -> tuple[fence_repository.FenceCounts, int, tuple[int, int] | None, list[Anchor]]:
    migrate.upgrade(staged_url)  # a backup taken on an older schema
    staged = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": staged_url})}
    )
    db = Database(staged_url, pool_size=2)
    try:
        envelope = open_keyring(staged, db)
        with db.read() as conn:
            checks = run_checks(conn, envelope, kme_id=settings.kme.id)
        broken = [c.name for c in checks if not c.passed]
        if broken:
            raise RestoreError(
                f"the backup's key store fails db check ({', '.join(broken)}); nothing restored"
            )
        identity = KmeIdentity(IdentityKeys(db), envelope, get_signature_provider(), get_kem_provider())
        with db.read() as conn:
            checkpoints = [c for c in audit_repository.read_checkpoints(conn) if isinstance(c, Checkpoint)]
            seq, _ = audit_repository.head(conn)
        last = checkpoints[-1].number if checkpoints else 0
        try:
            anchored = anchor_file(settings).read()
        except AnchorFileError as exc:
            raise RestoreError(f"the anchor file cannot be read: {exc}") from exc
        prefix = [a for a in anchored if a.number <= last]
        beyond = [a for a in anchored if a.number > last]
        adopted = not anchored and bool(checkpoints)
        if adopted:  # no anchor file here (a new host): the restored chain, verified below, is adopted
            keys = {k.version: k.public_key for k in identity.public_keys() if k.purpose == "sign"}
            prefix = [Anchor.of(cp, keys[cp.key_version]) for cp in checkpoints if cp.key_version in keys]
        with tempfile.TemporaryDirectory(prefix=".qkms-anchors-") as tmp:
            book = AnchorFile(Path(tmp) / "prefix.anchors.jsonl")
            with book.locked() as b:
                b.append(prefix)
            report = AuditService(db, identity, settings.kme.id, tail_window(settings), book).verify()
        if not report.ok:
            raise RestoreError(
                f"the backup's audit trail fails verification: {report.problems[0]}; nothing restored"
            )
        lost = (beyond[0].number, beyond[-1].number) if beyond else None
        now = datetime.now(UTC)
        reason = f"restored from backup {path.name}: may have been served after the snapshot"
        with db.write() as conn:
            counts = fence_repository.fence(conn, now, actor, reason)
            audit_recorder.append(
                conn,
                [
                    (actor, "backup.restored", settings.kme.id, {
                        "backup": path.name,
                        "backup_created_at": archive_created(path),
                        "snapshot_head_seq": seq,
                        "lost_checkpoints": list(lost) if lost else None,
                        "last_anchored_before_restore": _anchor_json(beyond[-1] if beyond else (prefix[-1] if prefix else None)),
                        "anchor_file_kept_as": f"{anchor_file(settings).path.name}.pre-restore-{stamp}" if anchored else None,
                        "anchors_adopted": adopted,
                    }),
                    (actor, "backup.fenced", settings.kme.id, {
                        "keys": counts.keys,
                        "consumed_in_window": counts.consumed_in_window,
                        "blocks": counts.blocks,
                        "bits": counts.bits,
                        "state": "compromised (pre_active: destroyed); material erased",
                    }),
                ],
                at=now,
            )  # fmt: skip
        return counts, seq, lost, prefix
    finally:
        db.dispose()


def archive_created(path: Path) -> str | None:
    created = backup_archive.read(path).manifest.get("created_at")
    return str(created) if created is not None else None


def _anchor_json(anchor: Anchor | None) -> dict[str, object] | None:
    if anchor is None:
        return None
    return {"number": anchor.number, "upto_seq": anchor.upto_seq, "hash": anchor.hash}


def _install(url: str, backend: str, staged_url: str, stamp: str) -> str:
    if backend == "sqlite":
        live = snapshot.sqlite_path(url)
        kept = live.with_name(f"{live.name}.pre-restore-{stamp}")
        existed = live.exists()
        snapshot.sqlite_install(snapshot.sqlite_path(staged_url), url, kept)
        return str(kept) if existed else "nothing (there was no store)"
    from sqlalchemy.engine import make_url

    kept_db = f"{make_url(url).database}_pre_restore_{stamp.lower()}"
    existed = snapshot.pg_install(url, kept_db)
    return f"database {kept_db}" if existed else "nothing (there was no database)"


def _cut_anchors(settings: KmsSettings, prefix: list[Anchor], stamp: str) -> str | None:
    """Keep the old anchor file as evidence and start the live one again from the restored history."""
    book = anchor_file(settings)
    kept: str | None = None
    if book.exists():
        target = book.path.with_name(f"{book.path.name}.pre-restore-{stamp}")
        os.replace(book.path, target)
        kept = str(target)
    with book.locked() as b:
        b.append(prefix)
    return kept


def _sign_and_check(settings: KmsSettings) -> tuple[list[IntegrityCheck], bool, list[str]]:
    db = Database(settings.database.url, pool_size=2)
    try:
        envelope = open_keyring(settings, db)
        identity = KmeIdentity(IdentityKeys(db), envelope, get_signature_provider(), get_kem_provider())
        CheckpointWriter.for_settings(db, identity, settings).write()
        with db.read() as conn:
            checks = run_checks(conn, envelope, kme_id=settings.kme.id)
        report = AuditService.for_settings(db, identity, settings).verify()
        return checks, report.ok, list(report.problems)
    finally:
        db.dispose()
