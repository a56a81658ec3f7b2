"""Start-up self-tests for a PQC backend, and the interoperability proof for an optional one.

Why both: a self-test shows a backend is internally consistent (and, via the known-answer digests,
that it computes FIPS key generation rather than something merely self-consistent); the interop
checks show an optional backend produces the *same* keys and accepts the *same* ciphertexts and
signatures as the default one, which is what lets two KMEs on different backends talk to each other.

Every result carries a short, secret-free detail; seeds used here are fresh random or public test
seeds, and nothing private is ever put into a result.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kms.crypto.pqc.base import (
    KEM_SIZES,
    ML_KEM_SHARED_SECRET_BYTES,
    SIGNATURE_SIZES,
    KemAlgorithm,
    KemProvider,
    SignatureAlgorithm,
    SignatureProvider,
)

# Power-on known answers: SHA-256 of the public key that a published seed must derive. Seeds and keys
# are from C2SP/wycheproof testvectors_v1 (mlkem_{768,1024}_test.json tcId 1, CCTV/strcmp;
# mldsa_{44,65}_sign_seed_test.json group 1, github/gendx); the full vectors are in
# tests/crypto/data/pqc_kat.json and checked there.
_KEM_KAT: dict[KemAlgorithm, tuple[str, str]] = {
    KemAlgorithm.ML_KEM_768: (
        "cbfc4405d1b2a3a386c94c25e0f2d5f5ee92cb0388ff4d6aa04223086d51c3fd"
        "24752da14c9fc3b8ae0d9e4a8b1016b8d8fc69e229c03ea2ef08a4ae0cffc37f",
        "67fe2cb60768d55758c67bfd5842692dedb14513d581c48db2cd3adf94568106",
    ),
    KemAlgorithm.ML_KEM_1024: (
        "8247c17686a8bc0b3afebe6bed1df1dc3ff7fa07c3670f624930235f20aecb43"
        "53ece11faa61f47d946ee501abb9a48029096de63b243a1794c4a760f98cc157",
        "5db6d38ecb5e92dda86dd468931bd4272def51b901c05979ce40053acc85a1e8",
    ),
}
_SIG_KAT: dict[SignatureAlgorithm, tuple[str, str]] = {
    SignatureAlgorithm.ML_DSA_44: (
        "2a" * 32,
        "d87f8ca136ac1aa55e2d6c4521680efb3a378cbb9bc0bfb446e9c60893931ea3",
    ),
    SignatureAlgorithm.ML_DSA_65: (
        "2a" * 32,
        "b7acce2ddb11f8cc1aa46e2bafac6eacfa2b732ef192bd636ad8d3a56d649c66",
    ),
}

_MESSAGE = b"QKMS PQC self-test message"
_CONTEXT = b"qkms-selftest"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome. ``detail`` explains a failure (or notes a skip) without secrets."""

    backend: str
    algorithm: str
    check: str
    passed: bool
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(backend: str, algorithm: str, check: str, body: Callable[[], str | None]) -> CheckResult:
    """Run one check; a returned string is a failure reason, an exception is a failure too."""
    start = time.perf_counter()
    try:
        problem = body()
    except Exception as exc:  # report, never propagate: the caller decides what a failure means
        problem = f"{type(exc).__name__}: {exc}"
    return CheckResult(
        backend=backend,
        algorithm=str(algorithm),
        check=check,
        passed=problem is None,
        detail=problem or "",
        seconds=round(time.perf_counter() - start, 6),
    )


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def kem_self_test(provider: KemProvider, alg: KemAlgorithm) -> list[CheckResult]:
    """Sizes, seed determinism, round trip, implicit rejection and the key-generation KAT."""
    sizes = KEM_SIZES[alg]
    name = provider.name
    seed = os.urandom(sizes.seed)
    results: list[CheckResult] = []

    def sizes_check() -> str | None:
        pair = provider.generate(alg)
        ct, ss = provider.encapsulate(alg, pair.public_key)
        got = (len(pair.public_key), len(ct), len(ss))
        want = (sizes.public_key, sizes.ciphertext, sizes.shared_secret)
        return None if got == want else f"(pk, ct, ss) sizes {got}, FIPS 203 says {want}"

    def determinism() -> str | None:
        first = provider.generate(alg, seed).public_key
        again = provider.public_key_from_seed(alg, seed)
        other = provider.public_key_from_seed(alg, os.urandom(sizes.seed))
        if first != again:
            return "the same seed derived two different public keys"
        return "two different seeds derived the same public key" if first == other else None

    def round_trip() -> str | None:
        pk = provider.public_key_from_seed(alg, seed)
        ct, ss = provider.encapsulate(alg, pk)
        if len(ss) != ML_KEM_SHARED_SECRET_BYTES:
            return f"shared secret is {len(ss)} bytes"
        return None if provider.decapsulate(alg, seed, ct) == ss else "decapsulated secret differs"

    def implicit_rejection() -> str | None:
        pk = provider.public_key_from_seed(alg, seed)
        ct, ss = provider.encapsulate(alg, pk)
        bad = _flip(ct, len(ct) // 2)
        rejected = provider.decapsulate(alg, seed, bad)
        if rejected == ss:
            return "a tampered ciphertext decapsulated to the genuine secret"
        if provider.decapsulate(alg, seed, bad) != rejected:
            return "implicit rejection is not deterministic"
        return None

    def known_answer() -> str | None:
        kat_seed, digest = _KEM_KAT[alg]
        pk = provider.public_key_from_seed(alg, bytes.fromhex(kat_seed))
        return None if hashlib.sha256(pk).hexdigest() == digest else "public key differs from the KAT"

    results.append(_run(name, alg, "sizes", sizes_check))
    results.append(_run(name, alg, "seed_determinism", determinism))
    results.append(_run(name, alg, "round_trip", round_trip))
    results.append(_run(name, alg, "implicit_rejection", implicit_rejection))
    if alg in _KEM_KAT:
        results.append(_run(name, alg, "known_answer_keygen", known_answer))
    return results


def signature_self_test(provider: SignatureProvider, alg: SignatureAlgorithm) -> list[CheckResult]:
    """Sizes, seed determinism, sign/verify with context, rejection of tampering, and the KAT."""
    sizes = SIGNATURE_SIZES[alg]
    name = provider.name
    seed = os.urandom(sizes.seed)
    results: list[CheckResult] = []

    def signed() -> tuple[bytes, bytes]:
        return provider.public_key_from_seed(alg, seed), provider.sign(alg, seed, _MESSAGE, _CONTEXT)

    def sizes_check() -> str | None:
        pk, sig = signed()
        got = (len(pk), len(sig))
        want = (sizes.public_key, sizes.signature)
        return None if got == want else f"(pk, sig) sizes {got}, FIPS 204 says {want}"

    def determinism() -> str | None:
        first = provider.generate(alg, seed).public_key
        again = provider.public_key_from_seed(alg, seed)
        other = provider.public_key_from_seed(alg, os.urandom(sizes.seed))
        if first != again:
            return "the same seed derived two different public keys"
        return "two different seeds derived the same public key" if first == other else None

    def round_trip() -> str | None:
        pk, sig = signed()
        if not provider.verify(alg, pk, _MESSAGE, sig, _CONTEXT):
            return "a fresh signature did not verify"
        empty = provider.sign(alg, seed, _MESSAGE)
        return None if provider.verify(alg, pk, _MESSAGE, empty) else "empty-context signature failed"

    def rejects_tampering() -> str | None:
        pk, sig = signed()
        if provider.verify(alg, pk, _MESSAGE + b"!", sig, _CONTEXT):
            return "a tampered message verified"
        if provider.verify(alg, pk, _MESSAGE, _flip(sig, len(sig) // 3), _CONTEXT):
            return "a tampered signature verified"
        if provider.verify(alg, pk, _MESSAGE, sig, _CONTEXT + b"x"):
            return "a signature verified under another context"
        if provider.verify(alg, pk, _MESSAGE, sig[:-1], _CONTEXT):
            return "a truncated signature verified"
        return None

    def known_answer() -> str | None:
        kat_seed, digest = _SIG_KAT[alg]
        pk = provider.public_key_from_seed(alg, bytes.fromhex(kat_seed))
        return None if hashlib.sha256(pk).hexdigest() == digest else "public key differs from the KAT"

    results.append(_run(name, alg, "sizes", sizes_check))
    results.append(_run(name, alg, "seed_determinism", determinism))
    results.append(_run(name, alg, "round_trip", round_trip))
    results.append(_run(name, alg, "rejects_tampering", rejects_tampering))
    if alg in _SIG_KAT:
        results.append(_run(name, alg, "known_answer_keygen", known_answer))
    return results


def self_test(kem: KemProvider, signature: SignatureProvider) -> tuple[CheckResult, ...]:
    """Every self-test for every algorithm of one backend."""
    results: list[CheckResult] = []
    for kem_alg in KemAlgorithm:
        results.extend(kem_self_test(kem, kem_alg))
    for sig_alg in SignatureAlgorithm:
        results.extend(signature_self_test(signature, sig_alg))
    return tuple(results)


def interop_checks(
    reference_kem: KemProvider,
    reference_sig: SignatureProvider,
    candidate_kem: KemProvider,
    candidate_sig: SignatureProvider,
) -> tuple[CheckResult, ...]:
    """Prove ``candidate`` interoperates with ``reference`` for every algorithm, both directions.

    Includes negative checks (the candidate must reject what the reference rejects and derive the same
    implicit-rejection secret), so a candidate that accepts everything cannot pass.
    """
    name = candidate_kem.name
    return (
        *_kem_interop(name, reference_kem, candidate_kem),
        *_signature_interop(name, reference_sig, candidate_sig),
    )


def _kem_interop(name: str, reference_kem: KemProvider, candidate_kem: KemProvider) -> list[CheckResult]:
    """:func:`interop_checks` for every KEM: same public key from a seed, encapsulation both ways."""
    results: list[CheckResult] = []
    for kem_alg in KemAlgorithm:
        seed = os.urandom(KEM_SIZES[kem_alg].seed)

        def same_kem_key(alg: KemAlgorithm = kem_alg, seed: bytes = seed) -> str | None:
            ours = reference_kem.public_key_from_seed(alg, seed)
            theirs = candidate_kem.public_key_from_seed(alg, seed)
            return None if ours == theirs else "the same seed gives different public keys"

        def encap_ref_decap_cand(alg: KemAlgorithm = kem_alg, seed: bytes = seed) -> str | None:
            pk = reference_kem.public_key_from_seed(alg, seed)
            ct, ss = reference_kem.encapsulate(alg, pk)
            if candidate_kem.decapsulate(alg, seed, ct) != ss:
                return "secrets differ"
            bad = _flip(ct, 7)
            if candidate_kem.decapsulate(alg, seed, bad) != reference_kem.decapsulate(alg, seed, bad):
                return "implicit-rejection secrets differ"
            return None

        def encap_cand_decap_ref(alg: KemAlgorithm = kem_alg, seed: bytes = seed) -> str | None:
            pk = candidate_kem.public_key_from_seed(alg, seed)
            ct, ss = candidate_kem.encapsulate(alg, pk)
            return None if reference_kem.decapsulate(alg, seed, ct) == ss else "secrets differ"

        results.append(_run(name, kem_alg, "same_public_key_from_seed", same_kem_key))
        results.append(
            _run(
                name, kem_alg, f"encapsulate {reference_kem.name} -> decapsulate {name}", encap_ref_decap_cand
            )
        )
        results.append(
            _run(
                name, kem_alg, f"encapsulate {name} -> decapsulate {reference_kem.name}", encap_cand_decap_ref
            )
        )
    return results


def _signature_interop(
    name: str, reference_sig: SignatureProvider, candidate_sig: SignatureProvider
) -> list[CheckResult]:
    """:func:`interop_checks` for every signature scheme: same public key from a seed, signing both ways."""
    results: list[CheckResult] = []
    for sig_alg in SignatureAlgorithm:
        seed = os.urandom(SIGNATURE_SIZES[sig_alg].seed)

        def same_sig_key(alg: SignatureAlgorithm = sig_alg, seed: bytes = seed) -> str | None:
            ours = reference_sig.public_key_from_seed(alg, seed)
            theirs = candidate_sig.public_key_from_seed(alg, seed)
            return None if ours == theirs else "the same seed gives different public keys"

        def sign_ref_verify_cand(alg: SignatureAlgorithm = sig_alg, seed: bytes = seed) -> str | None:
            pk = reference_sig.public_key_from_seed(alg, seed)
            sig = reference_sig.sign(alg, seed, _MESSAGE, _CONTEXT)
            if not candidate_sig.verify(alg, pk, _MESSAGE, sig, _CONTEXT):
                return "a valid signature was rejected"
            if candidate_sig.verify(alg, pk, _MESSAGE + b"!", sig, _CONTEXT):
                return "a signature over another message was accepted"
            if candidate_sig.verify(alg, pk, _MESSAGE, sig, b"other"):
                return "a signature under another context was accepted"
            return None

        def sign_cand_verify_ref(alg: SignatureAlgorithm = sig_alg, seed: bytes = seed) -> str | None:
            pk = candidate_sig.public_key_from_seed(alg, seed)
            sig = candidate_sig.sign(alg, seed, _MESSAGE, _CONTEXT)
            if not reference_sig.verify(alg, pk, _MESSAGE, sig, _CONTEXT):
                return "a valid signature was rejected"
            return None

        results.append(_run(name, sig_alg, "same_public_key_from_seed", same_sig_key))
        results.append(
            _run(name, sig_alg, f"sign {reference_sig.name} -> verify {name}", sign_ref_verify_cand)
        )
        results.append(
            _run(name, sig_alg, f"sign {name} -> verify {reference_sig.name}", sign_cand_verify_ref)
        )
    return results
