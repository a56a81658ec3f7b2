"""Assembles one KME from its settings: database, KEK envelope, registries, identity, delivery service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kms.config import ConfigError, KmsSettings, LinkSection
from kms.crypto.envelope import Envelope
from kms.crypto.identity import KmeIdentity
from kms.crypto.pqc.base import KemAlgorithm
from kms.crypto.pqc.registry import get_kem_provider, get_signature_provider
from kms.domain.policy import Mode, PairPolicy, PolicyBook, PolicyRule
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.runtime.filler import PoolFiller
from kms.runtime.sources import build_source
from kms.service import registry as registry_service
from kms.service.delivery import KeyDeliveryService
from kms.service.identity_keys import IdentityKeys
from kms.service.ingest import paired_block_numbers
from kms.storage.database import Database
from qkd_adapters.keyblock import FollowerKeySource

if TYPE_CHECKING:
    from kms.peer.countersign import Countersigner
    from kms.peer.network import PeerNetwork


@dataclass
class Runtime:
    settings: KmsSettings
    db: Database
    envelope: Envelope
    registry: SaeRegistry
    identity: KmeIdentity
    service: KeyDeliveryService
    network: PeerNetwork | None = None
    countersigner: Countersigner | None = None  # with peers: pushes audit checkpoints to them

    def reload_registry(self) -> None:
        entries = registry_service.registered_saes(self.db)
        if self.network is not None:  # database rows last: a peer's SAE it reported revoked wins (D-39)
            entries = self.network.directory.registry_entries() + entries
        self.registry.replace(entries)

    def make_filler(self) -> PoolFiller:
        stored = paired_block_numbers(self.db)  # a paired test source resumes where it stopped
        sources = [
            (
                build_source(link, base_dir=self.settings.config_dir, start_after=stored.get(link.id, 0)),
                link.peer_kme_id or self.settings.kme.id,
            )
            for link in self.settings.links
            if not _is_follower(link)
        ]
        return PoolFiller(
            self.settings.kme.id,
            self.db,
            self.envelope,
            self.settings.pool,
            sources,
            suspend_on=self.settings.link_health.suspend_on,
        )

    def close(self) -> None:
        if self.network is not None:
            self.network.close()
        self.db.dispose()


def _is_follower(link: LinkSection) -> bool:
    """A link end whose blocks arrive only when the peer KME announces them (ETSI 014 upstream follower)."""
    return link.source == "etsi014" and link.options.get("role") == "follower"


def build_network(settings: KmsSettings, runtime: Runtime) -> PeerNetwork | None:
    if not settings.peers:
        return None
    from kms.peer.directory import PeerDirectory
    from kms.peer.network import PeerNetwork

    followers: dict[str, FollowerKeySource] = {}
    for link in settings.links:
        if _is_follower(link):
            source = build_source(link, base_dir=settings.config_dir)
            if not isinstance(source, FollowerKeySource):
                raise ConfigError(f"link {link.id}: the follower end's adapter cannot fetch announced blocks")
            followers[link.id] = source
    try:
        directory = PeerDirectory.from_settings(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    network = PeerNetwork(
        settings.kme.id,
        settings.pool,
        settings.peering,
        runtime.db,
        runtime.envelope,
        runtime.identity,
        runtime.registry,
        directory,
        followers,
    )
    network.service = runtime.service
    network.sae_notices.refresh_seconds = settings.sae_registry.refresh_ms / 1000
    runtime.service.remote = network
    from kms.peer.countersign import CopyKeeper, Countersigner, PeerAudit

    audit_ctx = PeerAudit(
        settings.kme.id,
        runtime.db,
        runtime.identity,
        directory,
        settings.config_dir,
        settings.audit.anchor_dir,
    )
    network.extra_handlers.update(CopyKeeper(audit_ctx).handlers())
    runtime.countersigner = Countersigner(audit_ctx, network.client)
    return network


def load_envelope(settings: KmsSettings, db: Database | None = None) -> Envelope:
    """The KEK keyring (docs/DECISIONS.md D-27): every live version the database lists, checked;
    without ``db`` a short-lived connection reads the keyring."""
    from kms.service.kek_keyring import open_keyring

    if db is not None:
        return open_keyring(settings, db)
    own = Database(settings.database.url, pool_size=1)
    try:
        envelope = open_keyring(settings, own)
    finally:
        own.dispose()
    envelope.attach_sync(lambda _env: None, settings.kek.refresh_seconds)  # its database is gone
    return envelope


def policy_book(settings: KmsSettings) -> PolicyBook:
    p = settings.policy
    default = PairPolicy(Mode(p.mode), p.pqc_fallback, p.kem)
    rules = [PolicyRule(r.master, r.slave, PairPolicy(Mode(r.mode), r.pqc_fallback, p.kem)) for r in p.rules]
    return PolicyBook(default, rules)


def configured_entities(settings: KmsSettings) -> list[SaeInfo]:
    kme = settings.kme.id
    entries = [SaeInfo(s.id, s.kme_id or kme, s.cert_fingerprint) for s in settings.saes]
    entries += [SaeInfo(a.id, kme, a.cert_fingerprint, role="auditor") for a in settings.auditors]
    return entries


def build_runtime(settings: KmsSettings, sync_registry: bool = True, server: bool = False) -> Runtime:
    """Open the database and, with ``sync_registry``, write the configured SAEs, auditors and links
    into it and make sure the KME has its PQC identity keys. ``server``: the caller runs the
    background work (WAL checkpoints included)."""
    db = Database(
        settings.database.url,
        settings.database.pool_size,
        background_checkpoints=server,
        wal_limit_bytes=settings.database.wal_limit_mib * 1024 * 1024,
    )
    envelope = load_envelope(settings, db)
    identity = KmeIdentity(
        IdentityKeys(db),
        envelope,
        get_signature_provider(),
        get_kem_provider(),
        kem_algorithm=KemAlgorithm(settings.policy.kem),
    )
    if sync_registry:
        registry_service.sync_configured(db, settings.kme.id, configured_entities(settings), settings.links)
        identity.ensure()
    registry = SaeRegistry()
    service = KeyDeliveryService(
        settings.kme.id, settings.pool, db, envelope, registry, policy_book(settings), identity
    )
    runtime = Runtime(settings, db, envelope, registry, identity, service)
    runtime.network = build_network(settings, runtime)
    runtime.reload_registry()
    return runtime
