"""Assembles one KME from its settings: database, KEK envelope, SAE registry, delivery service, filler."""

from __future__ import annotations

from dataclasses import dataclass

from kms.config import KmsSettings
from kms.crypto.envelope import Envelope, load_kek_env, load_kek_file
from kms.domain.delivery import KeyDeliveryService
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.ingest import PoolFiller
from kms.sources import build_source
from kms.storage import registry_repository as registry_repo
from kms.storage.database import Database


@dataclass
class Runtime:
    settings: KmsSettings
    db: Database
    envelope: Envelope
    registry: SaeRegistry
    service: KeyDeliveryService

    def reload_registry(self) -> None:
        with self.db.read() as conn:
            self.registry.replace(registry_repo.load_saes(conn))

    def make_filler(self) -> PoolFiller:
        sources = [
            (build_source(link), link.peer_kme_id or self.settings.kme.id) for link in self.settings.links
        ]
        return PoolFiller(self.settings.kme.id, self.db, self.envelope, self.settings.pool, sources)

    def close(self) -> None:
        self.db.dispose()


def load_envelope(settings: KmsSettings) -> Envelope:
    kek = load_kek_file(settings.kek.file) if settings.kek.file else load_kek_env(settings.kek.env_var or "")
    return Envelope(kek, settings.kek.key_id)


def build_runtime(settings: KmsSettings, sync_registry: bool = True) -> Runtime:
    """Open the database and, with ``sync_registry``, write the configured SAEs and links into it."""
    db = Database(settings.database.url, settings.database.pool_size)
    envelope = load_envelope(settings)
    if sync_registry:
        with db.write() as conn:
            registry_repo.upsert_saes(
                conn,
                [SaeInfo(s.id, s.kme_id or settings.kme.id, s.cert_fingerprint) for s in settings.saes],
            )
            for link in settings.links:
                registry_repo.upsert_link(
                    conn,
                    link.id,
                    link.peer_kme_id or settings.kme.id,
                    link.source,
                    {"source": link.source, **link.options},
                )
    registry = SaeRegistry()
    runtime = Runtime(
        settings,
        db,
        envelope,
        registry,
        KeyDeliveryService(settings.kme.id, settings.pool, db, envelope, registry),
    )
    runtime.reload_registry()
    return runtime
