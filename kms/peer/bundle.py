"""A KME's *peer bundle*: everything another KME needs to trust it, and nothing secret.

``qkms peer export`` writes it; ``qkms peer add`` installs another KME's bundle. It holds the CA
certificate that issued the KME's TLS certificates, the pinned fingerprint of its client certificate
(role ``kme``), every version of its ML-DSA and ML-KEM public keys, and the SAEs it serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.crypto.pki import certificate_common_name, certificate_role, fingerprint_sha256

BUNDLE_FORMAT = "qkms-peer-bundle/1"


class BundleError(ValueError):
    """A peer bundle is missing, malformed or inconsistent; the message says which."""


@dataclass(frozen=True)
class PublicKey:
    purpose: str  # "sign" (ML-DSA) or "kem" (ML-KEM)
    algorithm: str
    version: int
    public_key: bytes
    state: str


@dataclass(frozen=True)
class PeerBundle:
    kme_id: str
    ca_cert_pem: str
    client_cert_fingerprint: str
    keys: tuple[PublicKey, ...]
    saes: tuple[str, ...]

    def sign_key(self, version: int) -> PublicKey | None:
        return next((k for k in self.keys if k.purpose == "sign" and k.version == version), None)

    def active_kem(self) -> PublicKey | None:
        return next((k for k in self.keys if k.purpose == "kem" and k.state == "active"), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "kme_id": self.kme_id,
            "ca_cert_pem": self.ca_cert_pem,
            "client_cert_fingerprint": self.client_cert_fingerprint,
            "keys": [
                {
                    "purpose": k.purpose,
                    "algorithm": k.algorithm,
                    "version": k.version,
                    "public_key": k.public_key.hex(),
                    "state": k.state,
                }
                for k in self.keys
            ],
            "saes": list(self.saes),
        }


def make_bundle(
    kme_id: str, ca_cert: Path, client_cert: Path, public_keys: list[dict[str, Any]], saes: list[str]
) -> PeerBundle:
    """Build this KME's bundle from its files and identity (``KmeIdentity.public_keys`` as JSON)."""
    try:
        client_pem = client_cert.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(
            f"no KME client certificate at {client_cert}; peering needs one (role 'kme'), see OPERATIONS.md"
        ) from exc
    if certificate_role(client_pem) != "kme" or certificate_common_name(client_pem) != kme_id:
        raise BundleError(f"{client_cert} is not a 'kme' certificate for {kme_id}")
    return PeerBundle(
        kme_id,
        ca_cert.read_text(encoding="utf-8"),
        fingerprint_sha256(client_pem),
        tuple(_key(k) for k in public_keys),
        tuple(saes),
    )


def load_bundle(path: Path) -> PeerBundle:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"peer bundle not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"peer bundle {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a {BUNDLE_FORMAT} file (made by `qkms peer export`)")
    try:
        return PeerBundle(
            str(data["kme_id"]),
            str(data["ca_cert_pem"]),
            str(data["client_cert_fingerprint"]),
            tuple(_key(k) for k in data["keys"]),
            tuple(str(s) for s in data["saes"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"peer bundle {path} is incomplete: {exc}") from exc


def _key(entry: dict[str, Any]) -> PublicKey:
    return PublicKey(
        str(entry["purpose"]),
        str(entry["algorithm"]),
        int(entry["version"]),
        bytes.fromhex(str(entry["public_key"])),
        str(entry["state"]),
    )
