"""SAE lifecycle rules and certificate checks without a server (issue 16, DECISIONS.md D-29)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kms.crypto import pki
from kms.crypto.sae_certs import (
    CertificateRefused,
    check_ca,
    check_client_certificate,
    install_trust_anchor,
    openssl_subject_hash,
    read_certificate,
)
from kms.domain.saes import GraceCertificate, SaeInfo, SaeRegistry, SaeState, sae_transition_refusal

NAMES = [
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "QKMS CA for KME-A")]),
    x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "  Example   BANK\tAG "),
            x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA 2"),
        ]
    ),
    x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "Zürich Root"),
                ]
            )
        ]
    ),
]


def _self_signed(name: x509.Name) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
    return builder.sign(key, hashes.SHA256())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to compare with")
@pytest.mark.parametrize("name", NAMES, ids=["cn", "c-o-cn-spaces", "multi-valued-utf8"])
def test_subject_hash_is_openssls(name: x509.Name) -> None:
    cert = _self_signed(name)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    expected = subprocess.run(
        ["openssl", "x509", "-noout", "-subject_hash"], input=pem, capture_output=True, check=True
    ).stdout.decode()
    assert openssl_subject_hash(cert) == expected.strip()


def test_trust_anchor_file_is_reused_and_owner_only(tmp_path: Path) -> None:
    ca = read_certificate(pki.create_ca("Bank CA").cert_pem, "ca")
    first = install_trust_anchor(tmp_path / "trusted", ca)
    assert install_trust_anchor(tmp_path / "trusted", ca) == first
    assert first.name == f"{openssl_subject_hash(ca)}.0"
    assert first.stat().st_mode & 0o077 == 0


def test_certificate_checks() -> None:
    ca = pki.create_ca("Bank CA")
    leaf = read_certificate(pki.issue_client_cert(ca, "SAE-1", role="sae").cert_pem, "leaf")
    auditor = read_certificate(pki.issue_client_cert(ca, "SAE-1", role="auditor").cert_pem, "leaf")
    now = dt.datetime.now(dt.UTC)
    check_client_certificate(leaf, "SAE-1", now)
    check_ca(read_certificate(ca.cert_pem, "ca"))
    with pytest.raises(CertificateRefused, match="is not a CA"):
        check_ca(leaf)
    with pytest.raises(CertificateRefused, match="CN is 'SAE-1', not the SAE ID 'SAE-2'"):
        check_client_certificate(leaf, "SAE-2", now)
    with pytest.raises(CertificateRefused, match="names the role 'auditor'"):
        check_client_certificate(auditor, "SAE-1", now)
    with pytest.raises(CertificateRefused, match="expired"):
        check_client_certificate(leaf, "SAE-1", now + dt.timedelta(days=1000))
    with pytest.raises(CertificateRefused, match="not a PEM or DER"):
        read_certificate(b"\x30\x03\x02\x01\x01", "cert.der")


def test_lifecycle_transitions() -> None:
    assert sae_transition_refusal(SaeState.ACTIVE, SaeState.SUSPENDED) is None
    assert sae_transition_refusal(SaeState.SUSPENDED, SaeState.ACTIVE) is None
    assert sae_transition_refusal(SaeState.SUSPENDED, SaeState.REVOKED) is None
    assert sae_transition_refusal(SaeState.ACTIVE, SaeState.ACTIVE) == "is already active"
    assert sae_transition_refusal(SaeState.REVOKED, SaeState.ACTIVE) is not None


def test_grace_certificate_accepted_until_its_time() -> None:
    info = SaeInfo("SAE-1", "KME-A", "new")
    registry = SaeRegistry()
    registry.replace([info], [GraceCertificate("old", "SAE-1", time.time() + 60)])
    assert registry.by_fingerprint("old") == info and registry.by_fingerprint("new") == info
    registry.replace([info], [GraceCertificate("old", "SAE-1", time.time() - 1)])
    assert registry.by_fingerprint("old") is None
    # A grace certificate of an SAE no longer registered is dropped.
    registry.replace([], [GraceCertificate("old", "SAE-1", time.time() + 60)])
    assert registry.by_fingerprint("old") is None


def test_version_check_at_most_once_per_interval() -> None:
    registry = SaeRegistry()
    assert registry.check_due(100.0, 0.1)
    assert not registry.check_due(100.05, 0.1)
    assert registry.check_due(100.1, 0.1)
