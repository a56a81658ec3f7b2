"""The KMEs this one knows: their bundles, where to reach them, and which SAEs each serves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from kms.config import KmsSettings
from kms.domain.saes import SaeInfo
from kms.peer.bundle import PeerBundle, PublicKey, load_bundle


@dataclass(frozen=True)
class Peer:
    kme_id: str
    url: str | None  # None: not adjacent, reached through relay only
    bundle: PeerBundle


def remote_sae_fingerprint(kme_id: str, sae_id: str) -> str:
    """A registry placeholder for an SAE served by another KME: the SHA-256 of a label, which no
    certificate's fingerprint can equal, so a remote SAE can never authenticate here."""
    return hashlib.sha256(f"qkms/remote-sae/{kme_id}/{sae_id}".encode()).hexdigest()


class PeerDirectory:
    def __init__(self, kme_id: str, peers: Iterable[Peer]) -> None:
        self.kme_id = kme_id
        self.peers = {p.kme_id: p for p in peers}
        self._sae_home: dict[str, str] = {}
        for peer in self.peers.values():
            if peer.bundle.kme_id != peer.kme_id:
                raise ValueError(f"the bundle configured for {peer.kme_id} belongs to {peer.bundle.kme_id}")
            for sae_id in peer.bundle.saes:
                if sae_id in self._sae_home:
                    raise ValueError(f"SAE {sae_id} is listed by two peer KMEs")
                self._sae_home[sae_id] = peer.kme_id

    @classmethod
    def from_settings(cls, settings: KmsSettings) -> PeerDirectory:
        peers = [Peer(p.kme_id, p.url, load_bundle(p.bundle)) for p in settings.peers]
        directory = cls(settings.kme.id, peers)
        local = {s.id for s in settings.saes}
        clash = local.intersection(directory._sae_home)
        if clash:
            raise ValueError(f"SAE IDs served here and by a peer KME: {sorted(clash)}")
        return directory

    def get(self, kme_id: str) -> Peer | None:
        return self.peers.get(kme_id)

    def home_of(self, sae_id: str) -> str | None:
        """The KME whose bundle lists ``sae_id`` as its own, if any."""
        return self._sae_home.get(sae_id)

    def adjacent(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.url]

    def sign_key(self, kme_id: str, version: int) -> PublicKey | None:
        peer = self.peers.get(kme_id)
        return peer.bundle.sign_key(version) if peer else None

    def kem_key(self, kme_id: str) -> PublicKey | None:
        peer = self.peers.get(kme_id)
        return peer.bundle.active_kem() if peer else None

    def ca_pems(self) -> list[str]:
        return [p.bundle.ca_cert_pem for p in self.peers.values()]

    def registry_entries(self) -> list[SaeInfo]:
        """Peer KMEs (role ``kme``, pinned client certificate) and the SAEs they serve (never
        authenticable here) for the SAE registry."""
        entries = [
            SaeInfo(p.kme_id, p.kme_id, p.bundle.client_cert_fingerprint, role="kme")
            for p in self.peers.values()
        ]
        entries += [
            SaeInfo(sae_id, kme_id, remote_sae_fingerprint(kme_id, sae_id))
            for sae_id, kme_id in self._sae_home.items()
        ]
        return entries
