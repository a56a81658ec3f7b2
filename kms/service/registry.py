"""The registries as a use case: the configured SAEs, auditors and links written into the database at
start (``kms.runtime.assembly.build_runtime``), and the registered SAEs read back for authentication.

Synchronising from the configuration is not audited: the configuration file is the record, and a
KME writes it again at every start. SAEs a ``qkms sae`` command changed are no longer overwritten
(their record is the database's and the audit's, ``kms.service.sae_lifecycle``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from kms.config import LinkSection
from kms.domain.saes import SaeInfo, SaeRegistry
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


def reload(db: Database, target: SaeRegistry, extra: Callable[[], list[SaeInfo]]) -> None:
    """Load the registry (entities, certificates in their grace period, version) in one snapshot;
    ``extra`` adds the entries that are not in the database (peer KMEs, remote SAEs)."""
    with db.read() as conn:
        version = registry.registry_version_of(conn)
        entries = registry.load_saes(conn)
        grace = registry.load_grace(conn, datetime.now(UTC))
    # The database's rows come last, so they win: a peer KME's SAE it has reported suspended or
    # revoked (``managed_by = 'peer'``, DECISIONS.md D-39) overrides the bundle's active entry.
    target.replace(extra() + entries, grace)
    target.version = version


def refresh_if_changed(
    db: Database, target: SaeRegistry, interval: float, extra: Callable[[], list[SaeInfo]]
) -> bool:
    """At most once per ``interval`` seconds, read the database's registry version and reload if it
    differs from the one ``target`` reflects (DECISIONS.md D-29). Returns True if it reloaded.

    Called before every request: between checks the cost is one clock reading and a comparison."""
    if not target.check_due(time.monotonic(), interval):
        return False
    with db.read() as conn:
        version = registry.registry_version_of(conn)
    if version == target.version:
        return False
    reload(db, target, extra)
    return True
