"""Registry gating, the interop proof's power to catch a wrong backend, and ``qkms doctor``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from kms.cli import doctor as doctor_module
from kms.crypto.pqc import (
    BackendUnavailableError,
    KemAlgorithm,
    SignatureAlgorithm,
    available_backends,
    get_kem_provider,
    get_signature_provider,
    registry,
)
from kms.crypto.pqc.pyca_backend import PycaKemProvider, PycaSignatureProvider
from kms.crypto.pqc.selftest import CheckResult, interop_checks, self_test


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    registry.clear_cache()
    yield
    registry.clear_cache()


class _AcceptsEverything(PycaSignatureProvider):
    """A broken backend: every signature 'verifies'."""

    name = "liar"

    def verify(
        self,
        alg: SignatureAlgorithm,
        public_key: bytes,
        message: bytes,
        signature: bytes,
        context: bytes = b"",
    ) -> bool:
        return True


class _OtherKeys(PycaKemProvider):
    """A backend whose key derivation differs (e.g. d and z swapped): self-consistent, not interoperable."""

    name = "swapped"

    def public_key_from_seed(self, alg: KemAlgorithm, private_seed: bytes) -> bytes:
        return super().public_key_from_seed(alg, private_seed[32:] + private_seed[:32])

    def decapsulate(self, alg: KemAlgorithm, private_seed: bytes, ciphertext: bytes) -> bytes:
        return super().decapsulate(alg, private_seed[32:] + private_seed[:32], ciphertext)


class _WrongRejectionKey(PycaKemProvider):
    """Decapsulates with z replaced: genuine ciphertexts still agree (K depends on d only), but the
    implicit-rejection secret J(z || c) differs, so it must not pass interop."""

    name = "wrong-z"

    def decapsulate(self, alg: KemAlgorithm, private_seed: bytes, ciphertext: bytes) -> bytes:
        return super().decapsulate(alg, private_seed[:32] + bytes(32), ciphertext)


def test_pyca_passes_its_own_self_test() -> None:
    results = self_test(PycaKemProvider(), PycaSignatureProvider())
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
    checks = {(r.algorithm, r.check) for r in results}
    assert ("ML-KEM-768", "implicit_rejection") in checks
    assert ("ML-DSA-65", "known_answer_keygen") in checks


def test_pyca_interoperates_with_itself() -> None:
    kem, sig = PycaKemProvider(), PycaSignatureProvider()
    results = interop_checks(kem, sig, kem, sig)
    assert len(results) == 3 * len(KemAlgorithm) + 3 * len(SignatureAlgorithm)
    assert all(r.passed for r in results)


def test_interop_catches_a_verifier_that_accepts_everything() -> None:
    kem, sig = PycaKemProvider(), PycaSignatureProvider()
    results = interop_checks(kem, sig, kem, _AcceptsEverything())
    failed = [r for r in results if not r.passed]
    assert failed and all("accepted" in r.detail for r in failed)
    assert {r.algorithm for r in failed} == {str(a) for a in SignatureAlgorithm}


def test_interop_catches_different_key_derivation() -> None:
    kem, sig = PycaKemProvider(), PycaSignatureProvider()
    results = interop_checks(kem, sig, _OtherKeys(), sig)
    failed = {(r.algorithm, r.check) for r in results if not r.passed}
    for alg in KemAlgorithm:
        assert (alg, "same_public_key_from_seed") in failed


def test_interop_catches_wrong_implicit_rejection() -> None:
    kem, sig = PycaKemProvider(), PycaSignatureProvider()
    results = interop_checks(kem, sig, _WrongRejectionKey(), sig)
    failed = [r for r in results if not r.passed]
    assert {r.algorithm for r in failed} == {str(a) for a in KemAlgorithm}
    assert all(r.detail == "implicit-rejection secrets differ" for r in failed)


def test_check_results_never_raise() -> None:
    class Exploding(PycaSignatureProvider):
        def sign(
            self, alg: SignatureAlgorithm, private_seed: bytes, message: bytes, context: bytes = b""
        ) -> bytes:
            raise RuntimeError("boom")

    results = self_test(PycaKemProvider(), Exploding())
    assert any(not r.passed and "RuntimeError: boom" in r.detail for r in results)


def test_default_backend_fails_closed(fresh_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(kem: object, sig: object) -> tuple[CheckResult, ...]:
        return (CheckResult("pyca", "ML-KEM-768", "round_trip", False, "simulated failure"),)

    monkeypatch.setattr(registry, "self_test", broken)
    with pytest.raises(BackendUnavailableError, match="simulated failure"):
        get_kem_provider()
    with pytest.raises(BackendUnavailableError):
        get_signature_provider("pyca")
    report = {r.name: r for r in available_backends()}
    assert report["pyca"].available is False
    assert report["liboqs"].available is False


def test_unknown_backend_name(fresh_registry: None) -> None:
    with pytest.raises(BackendUnavailableError, match="unknown PQC backend"):
        get_kem_provider("bouncycastle")


def test_results_are_cached(fresh_registry: None) -> None:
    assert get_kem_provider() is get_kem_provider()
    first = available_backends()
    assert available_backends() == first
    assert available_backends(refresh=True)[0] is not first[0]


def test_liboqs_absent_is_reported_not_raised(fresh_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OQS_INSTALL_PATH", os.devnull + "-no-such-dir")
    monkeypatch.setattr("kms.crypto.pqc.liboqs_backend.ctypes.util.find_library", lambda name: None)
    report = {r.name: r for r in available_backends()}["liboqs"]
    assert report.available is False and report.reason and "not found" in report.reason
    with pytest.raises(BackendUnavailableError, match="not usable"):
        get_kem_provider("liboqs")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(doctor_module.doctor)
    return app


def test_doctor_text_report() -> None:
    result = CliRunner().invoke(_app(), [])
    assert result.exit_code == 0, result.output
    for needle in ("cryptography", "OpenSSL", "pyca", "liboqs", "ML-KEM-768", "ML-DSA-87", "passed"):
        assert needle in result.output


def test_doctor_json_report() -> None:
    result = CliRunner().invoke(_app(), ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    names = [b["name"] for b in report["pqc_backends"]]
    assert names == ["pyca", "liboqs"]
    pyca = report["pqc_backends"][0]
    assert pyca["available"] and pyca["self_test_passed"]
    assert {c["algorithm"] for c in pyca["self_test"]} == {str(a) for a in KemAlgorithm} | {
        str(a) for a in SignatureAlgorithm
    }


def test_doctor_exits_non_zero_when_default_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    failing = registry.BackendReport(name="pyca", version="x", available=False, default=True, reason="broken")
    monkeypatch.setattr(doctor_module, "available_backends", lambda refresh=False: (failing,))
    result = CliRunner().invoke(_app(), [])
    assert result.exit_code == 1
    assert "FAILED" in result.output
    result_json = CliRunner().invoke(_app(), ["--json"])
    assert result_json.exit_code == 1 and json.loads(result_json.output)["ok"] is False


def test_doctor_report_has_no_private_material() -> None:
    text = json.dumps(doctor_module.doctor_report())
    assert "private_seed" not in text
    assert "2a2a2a2a" not in text  # the public KAT seeds stay inside the self-test
