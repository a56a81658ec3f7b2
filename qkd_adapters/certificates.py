"""A certificate's pinned identity (SHA-256 fingerprint, subject CN), read with pyca/cryptography only.

Shared by the KME (``kms.pki`` re-exports these with the rest of its X.509 tooling) and the simulated
QKD device (``qkd_adapters.simdevice``), which both authorise an mTLS caller by them; it lives here
because the device may not import ``kms``.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

__all__ = ["certificate_common_name", "fingerprint_sha256", "load_certificate", "subject_attribute"]


def load_certificate(data: bytes) -> x509.Certificate:
    """Accept PEM or DER, because TLS stacks hand out DER while files hold PEM."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def fingerprint_sha256(cert_der_or_pem: bytes) -> str:
    """Lower-case hex SHA-256 of the DER encoding, the same value `openssl x509 -fingerprint` shows."""
    cert = load_certificate(cert_der_or_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def subject_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    """The subject's one attribute ``oid``, None if absent; ValueError if there are several."""
    attrs = cert.subject.get_attributes_for_oid(oid)
    if not attrs:
        return None
    if len(attrs) > 1:
        # Ambiguous identity: refuse rather than guess which value the peer meant.
        raise ValueError(f"certificate subject has {len(attrs)} attributes {oid.dotted_string}")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def certificate_common_name(cert_der_or_pem: bytes) -> str:
    """Return the subject CN (the SAE ID for client certs); raise ValueError if absent."""
    cn = subject_attribute(load_certificate(cert_der_or_pem), NameOID.COMMON_NAME)
    if cn is None:
        raise ValueError("certificate subject has no commonName")
    return cn
