"""The certificate side of ``qkms sae add|rotate``: issue one from the site CA, or check and pin one
from a file (site CA or an enterprise CA, whose certificate then goes into the trust directory).

Issuing needs the site CA's key (``pki/ca.key`` beside ``tls.ca_cert``, as ``qkms init`` lays it
out). The credential is made in memory and written to ``pki/sae/<SAE>.pem|.key`` only after the
registry change committed (:func:`write_issued`), so a refused change leaves the files as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from kms.config import KmsSettings
from kms.crypto import pki
from kms.crypto.sae_certs import (
    CertificateRefused,
    check_ca,
    check_client_certificate,
    check_issued_by,
    install_trust_anchor,
    pinned,
    read_certificate,
)
from kms.domain.saes import PinnedCertificate
from kms.provision.workdir import sae_credential_paths
from kms.storage.file_modes import owner_only_umask


@dataclass(frozen=True)
class NewCertificate:
    """The certificate to pin and, when issued here, the credential to write once committed."""

    certificate: PinnedCertificate
    issued: pki.IssuedCredential | None = None


def trusted_ca_dir(settings: KmsSettings) -> Path:
    """Where enterprise CAs go (``sae_registry.trusted_ca_dir``, resolved against the config's directory)."""
    return settings.sae_registry.trusted_ca_dir


def _read(path: Path, what: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateRefused(f"cannot read {what} {path}: {exc.strerror}") from None
    return read_certificate(data, f"{what} {path}")


def issue(settings: KmsSettings, sae_id: str) -> NewCertificate:
    """A client certificate for ``sae_id`` from the site CA (role ``sae``), not yet written."""
    ca_key = settings.tls.ca_cert.with_suffix(".key")
    try:
        ca = pki.load_credential(settings.tls.ca_cert, ca_key)
    except (OSError, ValueError) as exc:
        raise CertificateRefused(f"cannot issue from the site CA ({ca_key}): {exc}") from None
    cred = pki.issue_client_cert(ca, sae_id, role="sae", valid_days=settings.sae_registry.issue_valid_days)
    return NewCertificate(pinned(read_certificate(cred.cert_pem, "issued certificate"), "site-ca"), cred)


def from_file(settings: KmsSettings, sae_id: str, cert_path: Path, ca_path: Path | None) -> NewCertificate:
    """Check a certificate for ``sae_id`` issued by the site CA or, with ``ca_path``, by that
    enterprise CA; an enterprise CA is installed in the trust directory (handshakes accept it at
    once). Raises ``CertificateRefused`` before anything is written if any check fails."""
    now = datetime.now(UTC)
    cert = _read(cert_path, "certificate")
    check_client_certificate(cert, sae_id, now)
    if ca_path is None:
        check_issued_by(
            cert, _read(settings.tls.ca_cert, "site CA"), "the site CA (give the issuing CA with --ca)"
        )
        return NewCertificate(pinned(cert, "site-ca"))
    ca = _read(ca_path, "CA certificate")
    check_ca(ca)
    if ca.not_valid_after_utc <= now:
        raise CertificateRefused(f"the CA certificate expired on {ca.not_valid_after_utc:%Y-%m-%d} UTC")
    check_issued_by(cert, ca, f"the CA in {ca_path}")
    with owner_only_umask():
        install_trust_anchor(trusted_ca_dir(settings), ca)
    return NewCertificate(pinned(cert, "enterprise"))


def write_issued(settings: KmsSettings, sae_id: str, new: NewCertificate) -> tuple[Path, Path] | None:
    """Write an issued credential to ``pki/sae/<SAE>.pem|.key`` (replacing a rotated one)."""
    if new.issued is None:
        return None
    cert_path, key_path = sae_credential_paths(settings.config_dir, sae_id)
    with owner_only_umask():
        pki.write_credential(new.issued, cert_path, key_path)
    return cert_path, key_path
