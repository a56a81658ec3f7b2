"""``qkms init``: a self-contained KME working directory (config, PKI, KEK, migrated database).

Layout::

    DIR/qkms.toml          the configuration
    DIR/pki/ca.pem, ca.key the CA that signs the KME's and the SAEs' certificates
    DIR/pki/kme.pem, .key  the KME's TLS server certificate
    DIR/pki/kme-client.pem, .key   the KME's client certificate for other KMEs (role "kme")
    DIR/pki/sae/<SAE>.pem, <SAE>.key   one client certificate per SAE, named after the SAE ID
    DIR/kek.bin            the key-encryption key, mode 0600
    DIR/qkms.db            the SQLite database (unless a database URL is given)

Everything is created owner-only (directories 0700, files 0600, certificates included): the config
can hold a database password, and the rest are keys, the KEK and the key store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from kms.config import KmsSettings
from kms.crypto import pki
from kms.crypto.envelope import generate_kek_file
from kms.runtime.assembly import build_runtime
from kms.storage import migrate
from kms.storage.file_modes import PRIVATE_DIR_MODE, owner_only_umask

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_NAME = "qkms.toml"


class InitError(RuntimeError):
    """The working directory cannot be created as asked; the message says why."""


@dataclass(frozen=True)
class InitResult:
    config_path: Path
    ca_cert: Path
    sae_credentials: dict[str, tuple[Path, Path]]
    auditor_credentials: dict[str, tuple[Path, Path]]


def sae_credential_paths(directory: Path, sae_id: str) -> tuple[Path, Path]:
    return directory / "pki" / "sae" / f"{sae_id}.pem", directory / "pki" / "sae" / f"{sae_id}.key"


def auditor_credential_paths(directory: Path, auditor_id: str) -> tuple[Path, Path]:
    return (
        directory / "pki" / "auditor" / f"{auditor_id}.pem",
        directory / "pki" / "auditor" / f"{auditor_id}.key",
    )


def default_link(kme_id: str, source: str) -> dict[str, Any]:
    if source == "random":
        return {
            "id": "link-local-1",
            "peer_kme_id": kme_id,
            "source": "random",
            "options": {"block_bits": 65536},
        }
    return {
        "id": "link-local-1",
        "peer_kme_id": kme_id,
        "source": "simulated",
        # GYS detectors (Gobby, Yuan, Shields 2004) behind a 1 GHz source, 25 km of fibre, 1 s blocks
        # (the finite-key bound needs ~1e9 pulses per block), paced at the physical rate.
        "options": {
            "preset": "gys",
            "distance_km": 25.0,
            "protocol": "decoy-bb84",
            "clock_rate_hz": 1e9,
            "seconds_per_block": 1.0,
            "pacing": "realtime",
            "channel_auth": "ml-dsa-session",
        },
    }


def init_workdir(
    directory: Path,
    kme_id: str,
    sae_ids: list[str],
    *,
    port: int = 8443,
    database_url: str | None = None,
    link_source: str | None = "simulated",
    pool_overrides: dict[str, Any] | None = None,
    auditor_ids: list[str] | None = None,
    policy: dict[str, Any] | None = None,
    pkcs11: dict[str, Any] | None = None,
) -> InitResult:
    """Create everything a KME needs in ``directory`` (which must be empty or absent), owner-only.

    ``pkcs11`` (module, token_label, optional key_label, pin_env) keeps the KEK wrapped by an HSM
    key instead of in a file; the token's PIN must be in the environment variable ``pin_env``."""
    with owner_only_umask():
        return _init_workdir(
            directory,
            kme_id,
            sae_ids,
            port=port,
            database_url=database_url,
            link_source=link_source,
            pool_overrides=pool_overrides,
            auditor_ids=auditor_ids,
            policy=policy,
            pkcs11=pkcs11,
        )


def _init_workdir(
    directory: Path,
    kme_id: str,
    sae_ids: list[str],
    *,
    port: int,
    database_url: str | None,
    link_source: str | None,
    pool_overrides: dict[str, Any] | None,
    auditor_ids: list[str] | None,
    policy: dict[str, Any] | None,
    pkcs11: dict[str, Any] | None,
) -> InitResult:
    auditor_ids = auditor_ids or []
    _check_ids(kme_id, sae_ids, auditor_ids)
    _prepare_directory(directory)
    ca = _write_kme_pki(directory, kme_id)
    saes, creds = _issue_sae_credentials(ca, directory, sae_ids)
    auditors, auditor_creds = _issue_auditor_credentials(ca, directory, auditor_ids)
    kek_section = _provision_kek(directory, pkcs11)
    config: dict[str, Any] = {
        "kme": {"id": kme_id, "host": "127.0.0.1", "port": port},
        "tls": {"ca_cert": "pki/ca.pem", "server_cert": "pki/kme.pem", "server_key": "pki/kme.key"},
        "database": {"url": database_url or "sqlite:///qkms.db"},
        "kek": kek_section,
        "pool": pool_overrides or {},
        "links": [default_link(kme_id, link_source)] if link_source else [],
        "saes": saes,
        "auditors": auditors,
        "policy": policy or {"mode": "qkd", "pqc_fallback": False, "kem": "ML-KEM-768"},
    }
    config_path = directory / CONFIG_NAME
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    settings = KmsSettings.load(config_path)
    migrate.upgrade(settings.database.url)
    build_runtime(settings, sync_registry=True).close()  # register the SAEs and links now
    return InitResult(config_path, directory / "pki" / "ca.pem", creds, auditor_creds)


def _check_ids(kme_id: str, sae_ids: list[str], auditor_ids: list[str]) -> None:
    """Every ID is safe as a file name and a certificate CN, and the SAE and auditor IDs are all distinct."""
    for ident in [kme_id, *sae_ids, *auditor_ids]:
        if not SAFE_ID.match(ident):
            raise InitError(f"ID {ident!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    if len(set(sae_ids + auditor_ids)) != len(sae_ids) + len(auditor_ids):
        raise InitError("SAE and auditor IDs must be distinct")


def _prepare_directory(directory: Path) -> None:
    """Create ``directory`` (absent or empty) owner-only, with its ``pki/sae`` folder."""
    if directory.exists() and any(directory.iterdir()):
        raise InitError(f"{directory} is not empty; choose a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(PRIVATE_DIR_MODE)  # an existing empty directory may have been 0755
    (directory / "pki" / "sae").mkdir(parents=True, exist_ok=True)


def _write_kme_pki(directory: Path, kme_id: str) -> pki.IssuedCredential:
    """The CA, the KME's TLS server certificate and its client certificate; returns the CA."""
    ca = pki.create_ca(f"QKMS CA for {kme_id}")
    pki.write_credential(ca, directory / "pki" / "ca.pem", directory / "pki" / "ca.key")
    server = pki.issue_server_cert(ca, kme_id)
    pki.write_credential(server, directory / "pki" / "kme.pem", directory / "pki" / "kme.key")
    # The KME's own client certificate for calling other KMEs (role "kme", CN = KME ID).
    peer_client = pki.issue_client_cert(ca, kme_id, role="kme")
    pki.write_credential(
        peer_client, directory / "pki" / "kme-client.pem", directory / "pki" / "kme-client.key"
    )
    return ca


def _issue_sae_credentials(
    ca: pki.IssuedCredential, directory: Path, sae_ids: list[str]
) -> tuple[list[dict[str, str]], dict[str, tuple[Path, Path]]]:
    """One client certificate per SAE: the config's ``saes`` entries and each SAE's (cert, key)."""
    saes = []
    creds: dict[str, tuple[Path, Path]] = {}
    for sae_id in sae_ids:
        cred = pki.issue_client_cert(ca, sae_id, role="sae")
        cert_path, key_path = sae_credential_paths(directory, sae_id)
        pki.write_credential(cred, cert_path, key_path)
        creds[sae_id] = (cert_path, key_path)
        saes.append({"id": sae_id, "cert_fingerprint": cred.fingerprint_sha256})
    return saes, creds


def _issue_auditor_credentials(
    ca: pki.IssuedCredential, directory: Path, auditor_ids: list[str]
) -> tuple[list[dict[str, str]], dict[str, tuple[Path, Path]]]:
    """One client certificate per auditor: the config's ``auditors`` entries and each (cert, key)."""
    auditors = []
    auditor_creds: dict[str, tuple[Path, Path]] = {}
    for auditor_id in auditor_ids:
        cred = pki.issue_client_cert(ca, auditor_id, role="auditor")
        cert_path, key_path = auditor_credential_paths(directory, auditor_id)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        pki.write_credential(cred, cert_path, key_path)
        auditor_creds[auditor_id] = (cert_path, key_path)
        auditors.append({"id": auditor_id, "cert_fingerprint": cred.fingerprint_sha256})
    return auditors, auditor_creds


def _provision_kek(directory: Path, pkcs11: dict[str, Any] | None) -> dict[str, Any]:
    """Create the KEK (a file, or wrapped by an HSM key when ``pkcs11`` is given); its config section."""
    if pkcs11:
        from kms.crypto.kek_pkcs11 import Pkcs11KekConfig, create_wrapping_key, provision_wrapped_kek

        p11 = {
            "key_label": "qkms-kek-wrap",
            "pin_env": "QKMS_PKCS11_PIN",
            **pkcs11,
            "wrapped_kek_file": "kek.wrapped",
        }
        cfg = Pkcs11KekConfig(
            module=Path(p11["module"]),
            token_label=p11["token_label"],
            key_label=p11["key_label"],
            wrapped_kek_file=directory / "kek.wrapped",
            pin_env=p11["pin_env"],
        )
        create_wrapping_key(cfg)
        provision_wrapped_kek(cfg)
        return {"pkcs11": {**p11, "module": str(p11["module"])}, "key_id": "kek-1"}
    generate_kek_file(directory / "kek.bin")
    return {"file": "kek.bin", "key_id": "kek-1"}
