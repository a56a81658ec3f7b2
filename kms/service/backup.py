"""``qkms backup``: a consistent online snapshot of the store with the configuration and the KEK
references, MAC'd under the active KEK (docs/DECISIONS.md D-28). The KME keeps serving meanwhile;
the backup is audited (``backup.taken``) in the live store after the snapshot, so the snapshot itself
does not contain its own record."""

from __future__ import annotations

import contextlib
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kms.config import KmsSettings
from kms.crypto import kek_sources
from kms.crypto.envelope import Envelope
from kms.service import audit_recorder, backup_archive
from kms.storage import kek_repository, migrate, snapshot
from kms.storage.database import Database


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def take_backup(
    settings: KmsSettings,
    config_path: Path,
    db: Database,
    envelope: Envelope,
    out: Path,
    actor: str = "operator",
) -> dict[str, Any]:
    """Write the backup of this KME to ``out`` (never over an existing file); returns its manifest."""
    if out.exists() or out.is_symlink():
        raise snapshot.SnapshotError(f"{out} already exists; refusing to overwrite it")
    url = settings.database.url
    backend = backend_of(url)
    member = backup_archive.DATABASE[backend]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".qkms-backup-") as tmp:
        dump = Path(tmp) / member
        if backend == "sqlite":
            snapshot.sqlite_snapshot(url, dump)
        else:
            snapshot.pg_snapshot(url, dump)
        with db.read() as conn:  # read after the snapshot: a superset of the versions it needs
            keyring = kek_repository.versions(conn)
        mac_kek_id = envelope.kek_id
        created = datetime.now(UTC)
        manifest: dict[str, Any] = {
            "format": backup_archive.FORMAT,
            "version": backup_archive.VERSION,
            "kme_id": settings.kme.id,
            "created_at": created.isoformat(),
            "backend": backend,
            "schema_revision": migrate.current_revision(f"sqlite:///{dump}" if backend == "sqlite" else url),
            "digests": {
                member: backup_archive.sha256_file(dump),
                backup_archive.CONFIG: backup_archive.sha256_file(config_path),
            },
            "keyring": [
                {
                    "kek_id": v.kek_id,
                    "state": v.state,
                    "reference": v.reference,
                    "check_value": v.check_value,
                }
                for v in keyring
                if v.state != "retired"
            ]
            or [
                {
                    "kek_id": mac_kek_id,
                    "state": "active",
                    "reference": _configured(settings),
                    "check_value": "",
                }
            ],
            "mac_kek_id": mac_kek_id,
        }
        raw = backup_archive.manifest_bytes(manifest)
        mac = envelope.mac(raw, mac_kek_id)
        try:
            backup_archive.write(out, raw, mac, (member, dump), config_path)
        except BaseException:
            with contextlib.suppress(OSError):
                out.unlink()
            raise
    with db.write() as conn:
        audit_recorder.record(
            conn,
            actor,
            "backup.taken",
            settings.kme.id,
            {
                "file": out.name,
                "backend": backend,
                "database_sha256": manifest["digests"][member],
                "kek_id": mac_kek_id,
            },
            at=created,
        )
    return manifest


def _configured(settings: KmsSettings) -> kek_sources.Reference:
    from kms.service.kek_keyring import configured_reference

    return configured_reference(settings.kek)
