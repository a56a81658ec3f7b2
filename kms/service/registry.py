"""The registries as a use case: the configured SAEs, auditors and links written into the database at
start (``kms.runtime.assembly.build_runtime``), and the registered SAEs read back for authentication.

Synchronising from the configuration is not audited: the configuration file is the record, and a
KME writes it again at every start.
"""

from __future__ import annotations

from collections.abc import Sequence

from kms.config import LinkSection
from kms.domain.saes import SaeInfo
from kms.storage import registry_repository as registry
from kms.storage.database import Database


def sync_configured(
    db: Database, kme_id: str, entities: Sequence[SaeInfo], links: Sequence[LinkSection]
) -> None:
    """Make the database's SAEs, auditors and links match the configuration (one transaction)."""
    with db.write() as conn:
        registry.upsert_saes(conn, entities)
        for link in links:
            registry.upsert_link(
                conn,
                link.id,
                link.peer_kme_id or kme_id,
                link.source,
                {"source": link.source, **link.options},
            )


def registered_saes(db: Database) -> list[SaeInfo]:
    """The SAEs and auditors the database holds."""
    with db.read() as conn:
        return registry.load_saes(conn)
