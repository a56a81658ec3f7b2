"""Checks on a certificate an operator pins for an SAE, and the trust-anchor directory for enterprise CAs.

``qkms sae add|rotate --cert FILE [--ca CA]`` accepts a client certificate issued by the site CA or by
a bank's own (enterprise) CA. It is pinned by fingerprint and subject like every other entity
(DECISIONS.md D-23, D-29), and refused with a one-line reason when it is not fit: not a certificate,
a CA certificate, CN not the SAE ID, a role other than ``sae``, no client-auth usage, expired, or
not signed by the CA named. An enterprise CA must itself be a CA (basic constraints CA=true, and
keyCertSign if it states key usages).

The TLS handshake must accept such a certificate too, without a restart: the server's TLS context
also trusts a directory (``sae_registry.trusted_ca_dir``), which OpenSSL searches at each handshake
for a file named after the issuer's subject hash (``<hash>.0``, the ``openssl rehash`` layout). This
module computes that hash as OpenSSL does (``X509_NAME_hash``: SHA-1 of the subject's canonical
encoding) so that no ``openssl`` binary is needed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms.domain.saes import PinnedCertificate
from qkd_adapters.certificates import fingerprint_sha256, subject_attribute


class CertificateRefused(ValueError):
    """A certificate (or CA) an operator gave is not fit to pin; the message is one line."""


def read_certificate(data: bytes, what: str) -> x509.Certificate:
    """One PEM or DER certificate, or ``CertificateRefused`` naming ``what`` it was meant to be."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertificateRefused(f"{what} is not a PEM or DER X.509 certificate") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check_ca(ca: x509.Certificate) -> None:
    """An issuing CA: basic constraints CA=true and, if it lists key usages, keyCertSign."""
    if not _is_ca(ca):
        raise CertificateRefused(
            f"the CA certificate ({ca.subject.rfc4514_string()}) is not a CA (basic constraints CA=false or absent)"
        )
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateRefused("the CA certificate may not sign certificates (key usage lacks keyCertSign)")


def check_client_certificate(cert: x509.Certificate, sae_id: str, now: dt.datetime) -> None:
    """Fit to identify SAE ``sae_id``: an end entity for client authentication, CN = the SAE ID,
    role ``sae`` if it names one, and valid now."""
    if _is_ca(cert):
        raise CertificateRefused("the certificate is a CA certificate, not an SAE's client certificate")
    try:
        common_name = subject_attribute(cert, NameOID.COMMON_NAME)
        role = subject_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    except ValueError as exc:
        raise CertificateRefused(f"the certificate's subject is ambiguous: {exc}") from None
    if common_name != sae_id:
        raise CertificateRefused(f"the certificate's CN is {common_name!r}, not the SAE ID {sae_id!r}")
    if role is not None and role != "sae":
        raise CertificateRefused(f"the certificate's OU names the role {role!r}, not 'sae'")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise CertificateRefused(
                "the certificate is not for TLS client authentication (no clientAuth usage)"
            )
    except x509.ExtensionNotFound:
        pass
    if cert.not_valid_after_utc <= now:
        raise CertificateRefused(f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now + dt.timedelta(minutes=5):
        raise CertificateRefused(
            f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def check_issued_by(cert: x509.Certificate, ca: x509.Certificate, ca_name: str) -> None:
    """``cert`` names ``ca`` as issuer and carries a valid signature by it."""
    if cert.issuer != ca.subject:
        raise CertificateRefused(
            f"the certificate was not issued by {ca_name} (issuer {cert.issuer.rfc4514_string()})"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        raise CertificateRefused(f"the certificate's signature does not verify under {ca_name}") from exc


def pinned(cert: x509.Certificate, origin: str) -> PinnedCertificate:
    return PinnedCertificate(
        fingerprint_sha256(cert.public_bytes(serialization.Encoding.DER)),
        cert.subject.rfc4514_string(),
        cert.issuer.rfc4514_string(),
        origin,
        cert.not_valid_after_utc,
    )


# --------------------------------------------------------------------------- trust anchors

# DER tags of the string types OpenSSL canonicalises (ASN1_MASK_CANON) and how to decode them.
_CANON = {
    0x0C: "utf-8",  # UTF8String
    0x13: "latin-1",  # PrintableString
    0x14: "latin-1",  # T61String (OpenSSL reads it as Latin-1)
    0x16: "latin-1",  # IA5String
    0x1A: "latin-1",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}
_SPACE = " \t\n\v\f\r"


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, contents, next position) of the DER element at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    return tag, data[pos : pos + length], pos + length


def _der(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes([tag, n]) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + contents


def _canonical_value(tag: int, value: bytes) -> bytes:
    """OpenSSL's asn1_string_canon: UTF-8, outer white space stripped, inner runs collapsed to
    one space, ASCII lower-cased; other types are kept as they are."""
    if tag not in _CANON:
        return _der(tag, value)
    text = value.decode(_CANON[tag]).encode("utf-8").strip(_SPACE.encode())
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c >= 0x80:
            out.append(c)
            i += 1
        elif chr(c) in _SPACE:
            out.append(0x20)
            while i < len(text) and chr(text[i]) in _SPACE:
                i += 1
        else:
            out.append(ord(chr(c).lower()))
            i += 1
    return _der(0x0C, bytes(out))


def openssl_subject_hash(cert: x509.Certificate) -> str:
    """The 8-hex-digit hash OpenSSL looks a CA up by in a CA directory (``openssl x509 -hash``)."""
    _, rdns, _ = _tlv(cert.subject.public_bytes(), 0)
    canon = b""
    pos = 0
    while pos < len(rdns):
        _, rdn, pos = _tlv(rdns, pos)
        entries = []
        inner = 0
        while inner < len(rdn):
            _, atv, inner = _tlv(rdn, inner)
            oid_tag, oid, after = _tlv(atv, 0)
            value_tag, value, _ = _tlv(atv, after)
            entries.append(_der(0x30, _der(oid_tag, oid) + _canonical_value(value_tag, value)))
        canon += _der(0x31, b"".join(sorted(entries)))
    digest = hashlib.sha1(canon, usedforsecurity=False).digest()
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def install_trust_anchor(directory: Path, ca: x509.Certificate) -> Path:
    """Put ``ca`` in the trust-anchor directory under its subject hash (owner-only); an identical
    file already there is reused, another CA with the same hash gets the next suffix."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = ca.public_bytes(serialization.Encoding.PEM)
    stem = openssl_subject_hash(ca)
    for suffix in range(100):
        path = directory / f"{stem}.{suffix}"
        if path.exists():
            if path.read_bytes() == pem:
                return path
            continue
        tmp = directory / f".{stem}.{suffix}.tmp"
        tmp.write_bytes(pem)
        tmp.chmod(0o600)
        tmp.replace(path)
        return path
    raise CertificateRefused("too many trusted CAs share this subject hash")


def trusted_anchors(directory: Path) -> list[x509.Certificate]:
    """The enterprise CAs the trust-anchor directory holds (for ``qkms status``)."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.[0-9]*")):
        try:
            found.append(read_certificate(path.read_bytes(), str(path)))
        except CertificateRefused:
            continue
    return found
