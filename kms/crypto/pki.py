"""X.509 material for the KME's mutual-TLS endpoints, built with pyca/cryptography only.

ETSI GS QKD 014 authenticates SAEs by their TLS client certificate, so the KME needs a small
private CA: one CA certificate, a server certificate for the KME and one client certificate per
SAE (CN = SAE ID). The caller's role ("sae", "auditor", "kme") travels in the subject's
organizationalUnitName so the API layer can authorise without a side table.

Keys are ECDSA P-256 (small, fast, universally supported by TLS 1.2/1.3 stacks) and are stored as
unencrypted PKCS#8 PEM; confidentiality of key files relies on mode 0600, set at creation time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A certificate's pinned identity is shared with the simulated QKD device, which may not import kms.
from qkd_adapters.certificates import (
    certificate_common_name,
    fingerprint_sha256,
    load_certificate,
    subject_attribute,
)

__all__ = [
    "ROLES",
    "IssuedCredential",
    "certificate_common_name",
    "certificate_role",
    "client_urn",
    "create_ca",
    "fingerprint_sha256",
    "issue_client_cert",
    "issue_server_cert",
    "load_credential",
    "write_credential",
]

ROLES: frozenset[str] = frozenset({"sae", "auditor", "kme"})

# Backdate notBefore slightly so peers with a little clock skew accept freshly issued certs.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedCredential:
    """A certificate plus its private key, both PEM; the fingerprint identifies the cert in logs."""

    cert_pem: bytes
    key_pem: bytes
    fingerprint_sha256: str


# --------------------------------------------------------------------------- helpers


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _credential(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> IssuedCredential:
    der = cert.public_bytes(serialization.Encoding.DER)
    return IssuedCredential(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
    )


def _load_ca(ca: IssuedCredential) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA private key must be an EC key")
    return cert, key


def _validity(valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    now = dt.datetime.now(dt.UTC)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=valid_days)


def _leaf_builder(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    leaf_key: ec.EllipticCurvePrivateKey,
    valid_days: int,
    eku: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    """Common leaf profile: end-entity, digitalSignature only, one EKU, key identifiers."""
    not_before, not_after = _validity(valid_days)
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:  # CA made elsewhere without an SKI: derive one from its key
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )


# --------------------------------------------------------------------------- issuing


def create_ca(common_name: str, valid_days: int = 3650) -> IssuedCredential:
    """Create a self-signed CA that may sign leaves only (path_length=0: no intermediates)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(valid_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _credential(cert, key)


def issue_server_cert(
    ca: IssuedCredential,
    common_name: str,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    valid_days: int = 825,
) -> IssuedCredential:
    """Issue a KME server certificate; TLS clients match the SAN, never the CN, so both are set."""
    if isinstance(hostnames, str) or isinstance(ip_addresses, str):
        raise TypeError("hostnames and ip_addresses must be sequences of strings, not a string")
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if not sans:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _leaf_builder(ca_cert, ca_key, subject, key, valid_days, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _credential(cert, key)


def issue_client_cert(
    ca: IssuedCredential,
    common_name: str,
    role: str = "sae",
    valid_days: int = 825,
) -> IssuedCredential:
    """Issue a client certificate: CN is the SAE ID, OU the role used for authorisation."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    # RFC 5280 profiles (and cryptography's ClientVerifier) require a SAN on end-entity certs; a
    # URN carrying role and ID gives verifiers a subject without inventing a DNS name for an SAE.
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(client_urn(common_name, role))])
    cert = (
        _leaf_builder(ca_cert, ca_key, subject, key, valid_days, ExtendedKeyUsageOID.CLIENT_AUTH)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _credential(cert, key)


def client_urn(common_name: str, role: str) -> str:
    """SAN URI put into client certs: ``urn:qkms:<role>:<percent-encoded id>``."""
    return f"urn:qkms:{role}:{urllib.parse.quote(common_name, safe='')}"


# --------------------------------------------------------------------------- inspection


# fingerprint_sha256 and certificate_common_name: qkd_adapters.certificates (imported above).


def certificate_role(cert_der_or_pem: bytes) -> str | None:
    """Return the subject OU when it is a known role, else None (e.g. a foreign or server cert)."""
    ou = subject_attribute(load_certificate(cert_der_or_pem), NameOID.ORGANIZATIONAL_UNIT_NAME)
    return ou if ou in ROLES else None


# --------------------------------------------------------------------------- files


def load_credential(cert_path: Path, key_path: Path) -> IssuedCredential:
    """Read a PEM cert/key pair and check the key actually belongs to the certificate."""
    cert_pem = Path(cert_path).read_bytes()
    key_pem = Path(key_path).read_bytes()
    cert = load_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise ValueError(f"private key {key_path} does not match certificate {cert_path}")
    return IssuedCredential(
        cert_pem=cert_pem,
        key_pem=key_pem,
        fingerprint_sha256=fingerprint_sha256(cert_pem),
    )


def write_credential(cred: IssuedCredential, cert_path: Path, key_path: Path) -> None:
    """Write cert (0644) and key (0600).

    The key file is created with mode 0600 by os.open so it is never readable by others, not even
    briefly; an existing file is replaced via a fresh 0600 temp file and an atomic rename, because
    O_CREAT's mode does not apply to files that already exist.
    """
    cert_path = Path(cert_path)
    key_path = Path(key_path)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_new_file(key_path, cred.key_pem, 0o600)
    _write_new_file(cert_path, cred.cert_pem, 0o644)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
