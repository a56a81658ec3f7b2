"""Tests for kms.crypto.pki: certificate profiles, chain verification, key files and a real mTLS handshake."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kms.crypto import pki


@pytest.fixture(scope="module")
def ca() -> pki.IssuedCredential:
    return pki.create_ca("QKMS Test CA")


@pytest.fixture(scope="module")
def other_ca() -> pki.IssuedCredential:
    return pki.create_ca("Rogue CA")


@pytest.fixture(scope="module")
def server(ca: pki.IssuedCredential) -> pki.IssuedCredential:
    return pki.issue_server_cert(
        ca, "kme-a", hostnames=("localhost", "kme-a.local"), ip_addresses=("127.0.0.1", "::1")
    )


@pytest.fixture(scope="module")
def client(ca: pki.IssuedCredential) -> pki.IssuedCredential:
    return pki.issue_client_cert(ca, "SAE_A_1", role="sae")


def _cert(cred: pki.IssuedCredential) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cred.cert_pem)


def _store(ca: pki.IssuedCredential) -> Store:
    return Store([_cert(ca)])


# --------------------------------------------------------------------------- profiles


def test_ca_profile(ca: pki.IssuedCredential) -> None:
    cert = _cert(ca)
    assert cert.subject == cert.issuer
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name in {"secp256r1", "secp384r1"}
    cert.verify_directly_issued_by(cert)  # self-signed signature is valid


def test_private_key_is_unencrypted_pkcs8(client: pki.IssuedCredential) -> None:
    assert client.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(client.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_server_cert_profile(ca: pki.IssuedCredential, server: pki.IssuedCredential) -> None:
    cert = _cert(server)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "kme-a.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = _cert(ca).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    assert pki.certificate_common_name(server.cert_pem) == "kme-a"
    assert pki.certificate_role(server.cert_pem) is None


def test_server_cert_defaults(ca: pki.IssuedCredential) -> None:
    cert = _cert(pki.issue_server_cert(ca, "kme"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_client_cert_profile(ca: pki.IssuedCredential, client: pki.IssuedCredential) -> None:
    cert = _cert(client)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "sae"
    assert cert.issuer == _cert(ca).subject
    assert pki.certificate_common_name(client.cert_pem) == "SAE_A_1"
    assert pki.certificate_role(client.cert_pem) == "sae"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:qkms:sae:SAE_A_1"]


def test_client_urn_escapes_id() -> None:
    assert pki.client_urn("a b/c:d", "auditor") == "urn:qkms:auditor:a%20b%2Fc%3Ad"


@pytest.mark.parametrize("role", ["sae", "auditor", "kme"])
def test_role_extraction(ca: pki.IssuedCredential, role: str) -> None:
    cred = pki.issue_client_cert(ca, f"id-{role}", role=role)
    der = _cert(cred).public_bytes(serialization.Encoding.DER)
    assert pki.certificate_role(cred.cert_pem) == role
    assert pki.certificate_role(der) == role
    assert pki.certificate_common_name(der) == f"id-{role}"


def test_unknown_role_rejected(ca: pki.IssuedCredential) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        pki.issue_client_cert(ca, "x", role="admin")


def test_ca_without_role_has_no_role(ca: pki.IssuedCredential) -> None:
    assert pki.certificate_role(ca.cert_pem) is None
    assert pki.certificate_common_name(ca.cert_pem) == "QKMS Test CA"


def test_validity_window(ca: pki.IssuedCredential) -> None:
    cert = _cert(pki.issue_client_cert(ca, "SAE_V", valid_days=10))
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    assert dt.timedelta(days=9) < cert.not_valid_after_utc - now <= dt.timedelta(days=10)
    with pytest.raises(ValueError):
        pki.issue_client_cert(ca, "SAE_V", valid_days=0)


# --------------------------------------------------------------------------- chain verification


def test_client_chain_verifies(ca: pki.IssuedCredential, client: pki.IssuedCredential) -> None:
    verifier = PolicyBuilder().store(_store(ca)).build_client_verifier()
    result = verifier.verify(_cert(client), [])
    assert result.chain[-1] == _cert(ca)
    assert result.subjects == [x509.UniformResourceIdentifier("urn:qkms:sae:SAE_A_1")]
    _cert(client).verify_directly_issued_by(_cert(ca))


def test_server_chain_verifies(ca: pki.IssuedCredential, server: pki.IssuedCredential) -> None:
    for name in (x509.DNSName("localhost"), x509.DNSName("kme-a.local")):
        chain = PolicyBuilder().store(_store(ca)).build_server_verifier(name).verify(_cert(server), [])
        assert chain[-1] == _cert(ca)
    wrong = PolicyBuilder().store(_store(ca)).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        wrong.verify(_cert(server), [])


def test_client_cert_rejected_by_other_ca(
    other_ca: pki.IssuedCredential, client: pki.IssuedCredential
) -> None:
    verifier = PolicyBuilder().store(_store(other_ca)).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(_cert(client), [])
    with pytest.raises(ValueError):
        _cert(client).verify_directly_issued_by(_cert(other_ca))


def test_server_cert_not_usable_as_client(ca: pki.IssuedCredential, server: pki.IssuedCredential) -> None:
    verifier = PolicyBuilder().store(_store(ca)).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(_cert(server), [])


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_stable_and_format_independent(client: pki.IssuedCredential) -> None:
    der = _cert(client).public_bytes(serialization.Encoding.DER)
    fp = pki.fingerprint_sha256(client.cert_pem)
    assert fp == client.fingerprint_sha256
    assert fp == pki.fingerprint_sha256(der)
    assert fp == pki.fingerprint_sha256(client.cert_pem)
    assert len(fp) == 64 and fp == fp.lower()
    int(fp, 16)


def test_fingerprints_differ_between_certs(ca: pki.IssuedCredential) -> None:
    a = pki.issue_client_cert(ca, "SAE_X")
    b = pki.issue_client_cert(ca, "SAE_X")
    assert a.fingerprint_sha256 != b.fingerprint_sha256


# --------------------------------------------------------------------------- files


def test_write_and_load_roundtrip(tmp_path: Path, client: pki.IssuedCredential) -> None:
    cert_path, key_path = tmp_path / "sub" / "sae.crt", tmp_path / "sub" / "sae.key"
    pki.write_credential(client, cert_path, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not stat.S_IMODE(cert_path.stat().st_mode) & 0o022
    assert pki.load_credential(cert_path, key_path) == client
    # no temp files left behind
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["sae.crt", "sae.key"]


def test_overwrite_keeps_key_mode_0600(tmp_path: Path, ca: pki.IssuedCredential) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    cred = pki.issue_client_cert(ca, "SAE_O")
    pki.write_credential(cred, cert_path, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes() == cred.key_pem


def test_load_rejects_mismatched_key(
    tmp_path: Path, ca: pki.IssuedCredential, client: pki.IssuedCredential
) -> None:
    other = pki.issue_client_cert(ca, "SAE_B")
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    pki.write_credential(
        pki.IssuedCredential(client.cert_pem, other.key_pem, client.fingerprint_sha256), cert_path, key_path
    )
    with pytest.raises(ValueError, match="does not match"):
        pki.load_credential(cert_path, key_path)


# --------------------------------------------------------------------------- real TLS handshake


def _files(tmp_path: Path, name: str, cred: pki.IssuedCredential) -> tuple[Path, Path]:
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    pki.write_credential(cred, cert_path, key_path)
    return cert_path, key_path


def _handshake(
    tmp_path: Path,
    ca: pki.IssuedCredential,
    server: pki.IssuedCredential,
    client: pki.IssuedCredential | None,
    *,
    server_name: str = "localhost",
) -> tuple[str | Exception, str | Exception]:
    """Run one mTLS exchange on 127.0.0.1; return (server outcome, client outcome)."""
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.cert_pem)
    s_cert, s_key = _files(tmp_path, "server", server)

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_2
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.verify_flags |= ssl.VERIFY_X509_STRICT
    sctx.load_verify_locations(cafile=ca_path)
    sctx.load_cert_chain(s_cert, s_key)

    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED by default
    cctx.verify_flags |= ssl.VERIFY_X509_STRICT
    cctx.load_verify_locations(cafile=ca_path)
    if client is not None:
        cctx.load_cert_chain(*_files(tmp_path, "client", client))

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    server_result: list[str | Exception] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with sctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                assert peer is not None
                cn = pki.certificate_common_name(peer)
                tls.sendall(f"hello {cn}".encode())
                server_result.append(cn)
        except Exception as exc:
            server_result.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client_result: str | Exception
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            cctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            # With TLS 1.3 the client finishes its handshake before the server has checked the
            # client certificate, so a refusal only surfaces on the first read.
            data = tls.recv(1024)
            client_result = data.decode() if data else ConnectionError("closed without data")
    except Exception as exc:
        client_result = exc
    t.join(10)
    listener.close()
    assert server_result, "server thread produced no result"
    return server_result[0], client_result


def test_mtls_handshake_succeeds(
    tmp_path: Path, ca: pki.IssuedCredential, server: pki.IssuedCredential, client: pki.IssuedCredential
) -> None:
    srv, cli = _handshake(tmp_path, ca, server, client)
    assert srv == "SAE_A_1"
    assert cli == "hello SAE_A_1"


def test_mtls_handshake_over_ip_san(
    tmp_path: Path, ca: pki.IssuedCredential, server: pki.IssuedCredential, client: pki.IssuedCredential
) -> None:
    srv, cli = _handshake(tmp_path, ca, server, client, server_name="127.0.0.1")
    assert srv == "SAE_A_1"
    assert cli == "hello SAE_A_1"


def test_mtls_refuses_client_from_other_ca(
    tmp_path: Path, ca: pki.IssuedCredential, other_ca: pki.IssuedCredential, server: pki.IssuedCredential
) -> None:
    rogue = pki.issue_client_cert(other_ca, "SAE_A_1")
    srv, cli = _handshake(tmp_path, ca, server, rogue)
    assert isinstance(srv, ssl.SSLError), srv
    assert "certificate verify failed" in str(srv) or "unknown ca" in str(srv).lower()
    assert isinstance(cli, Exception), cli


def test_mtls_refuses_missing_client_cert(
    tmp_path: Path, ca: pki.IssuedCredential, server: pki.IssuedCredential
) -> None:
    srv, cli = _handshake(tmp_path, ca, server, None)
    assert isinstance(srv, ssl.SSLError), srv
    assert isinstance(cli, Exception), cli


def test_client_refuses_server_from_other_ca(
    tmp_path: Path, ca: pki.IssuedCredential, other_ca: pki.IssuedCredential, client: pki.IssuedCredential
) -> None:
    rogue_server = pki.issue_server_cert(other_ca, "kme-evil")
    srv, cli = _handshake(tmp_path, ca, rogue_server, client)
    assert isinstance(cli, ssl.SSLCertVerificationError), cli
    assert isinstance(srv, Exception), srv
