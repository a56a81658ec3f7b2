"""Behaviour every PQC backend must show, run against pyca and (when its library is present) liboqs."""

from __future__ import annotations

import os

import pytest

from kms.crypto.pqc import (
    KEM_SIZES,
    SIGNATURE_SIZES,
    InvalidCiphertextError,
    InvalidKeyError,
    KemAlgorithm,
    KemKeyPair,
    KemProvider,
    PqcError,
    SignatureAlgorithm,
    SignatureKeyPair,
    SignatureProvider,
    UnsupportedAlgorithmError,
    get_kem_provider,
    get_signature_provider,
)
from kms.crypto.pqc.liboqs_backend import find_liboqs

KEMS = list(KemAlgorithm)
SIGS = list(SignatureAlgorithm)

# FIPS 203 Table 3 (bytes): encapsulation key, decapsulation key, ciphertext, shared secret.
FIPS203_TABLE3 = {
    "ML-KEM-768": (1184, 2400, 1088, 32),
    "ML-KEM-1024": (1568, 3168, 1568, 32),
}
# FIPS 204 Table 2 (bytes): private key, public key, signature.
FIPS204_TABLE2 = {
    "ML-DSA-44": (2560, 1312, 2420),
    "ML-DSA-65": (4032, 1952, 3309),
    "ML-DSA-87": (4896, 2592, 4627),
}


def _liboqs_or_skip() -> None:
    location, reason = find_liboqs()
    if location is None:
        pytest.skip(f"liboqs backend not testable here: {reason} (set OQS_INSTALL_PATH to a liboqs install)")


@pytest.fixture(params=["pyca", "liboqs"])
def kem(request: pytest.FixtureRequest) -> KemProvider:
    if request.param == "liboqs":
        _liboqs_or_skip()  # present but failing its checks is a failure, not a skip
    return get_kem_provider(request.param)


@pytest.fixture(params=["pyca", "liboqs"])
def sig(request: pytest.FixtureRequest) -> SignatureProvider:
    if request.param == "liboqs":
        _liboqs_or_skip()
    return get_signature_provider(request.param)


def test_size_tables_match_fips() -> None:
    for alg, (ek, dk, ct, ss) in FIPS203_TABLE3.items():
        sizes = KEM_SIZES[KemAlgorithm(alg)]
        assert (sizes.public_key, sizes.expanded_private_key, sizes.ciphertext, sizes.shared_secret) == (
            ek,
            dk,
            ct,
            ss,
        )
        assert sizes.seed == 64
    for alg, (sk, pk, sg) in FIPS204_TABLE2.items():
        s = SIGNATURE_SIZES[SignatureAlgorithm(alg)]
        assert (s.expanded_private_key, s.public_key, s.signature, s.seed) == (sk, pk, sg, 32)


def test_providers_satisfy_protocols(kem: KemProvider, sig: SignatureProvider) -> None:
    assert isinstance(kem, KemProvider) and isinstance(sig, SignatureProvider)
    assert kem.name in ("pyca", "liboqs") and kem.version
    assert sig.name in ("pyca", "liboqs") and sig.version


@pytest.mark.parametrize("alg", KEMS)
def test_kem_round_trip_and_sizes(kem: KemProvider, alg: KemAlgorithm) -> None:
    pair = kem.generate(alg)
    ct, ss = kem.encapsulate(alg, pair.public_key)
    assert len(pair.public_key) == FIPS203_TABLE3[alg][0]
    assert len(ct) == FIPS203_TABLE3[alg][2]
    assert len(ss) == 32
    assert kem.decapsulate(alg, pair.private_seed, ct) == ss
    ct2, ss2 = kem.encapsulate(alg, pair.public_key)
    assert ct2 != ct and ss2 != ss  # encapsulation is randomised


@pytest.mark.parametrize("alg", KEMS)
def test_kem_tampered_ciphertext_gives_implicit_rejection_secret(kem: KemProvider, alg: KemAlgorithm) -> None:
    pair = kem.generate(alg)
    ct, ss = kem.encapsulate(alg, pair.public_key)
    for index in (0, len(ct) // 2, len(ct) - 1):
        bad = bytearray(ct)
        bad[index] ^= 0x80
        rejected = kem.decapsulate(alg, pair.private_seed, bytes(bad))  # no exception: implicit rejection
        assert len(rejected) == 32
        assert rejected != ss
        assert kem.decapsulate(alg, pair.private_seed, bytes(bad)) == rejected  # deterministic J(z || c)
    other = kem.generate(alg)
    assert kem.decapsulate(alg, other.private_seed, ct) != ss  # wrong key: also a different secret


@pytest.mark.parametrize("alg", KEMS)
def test_kem_seed_reproduces_key(kem: KemProvider, alg: KemAlgorithm) -> None:
    seed = os.urandom(64)
    pair = kem.generate(alg, seed)
    assert pair.private_seed == seed
    assert kem.generate(alg, seed) == pair
    assert kem.public_key_from_seed(alg, seed) == pair.public_key
    assert kem.public_key_from_seed(alg, os.urandom(64)) != pair.public_key


@pytest.mark.parametrize("alg", KEMS)
def test_kem_rejects_malformed_input(kem: KemProvider, alg: KemAlgorithm) -> None:
    pair = kem.generate(alg)
    ct, _ = kem.encapsulate(alg, pair.public_key)
    with pytest.raises(InvalidCiphertextError):
        kem.decapsulate(alg, pair.private_seed, ct[:-1])
    with pytest.raises(InvalidCiphertextError):
        kem.decapsulate(alg, pair.private_seed, ct + b"\x00")
    with pytest.raises(InvalidKeyError):
        kem.encapsulate(alg, pair.public_key[:-1])
    with pytest.raises(InvalidKeyError):  # right length, coefficients >= q: FIPS 203 modulus check
        kem.encapsulate(alg, b"\xff" * len(pair.public_key))
    with pytest.raises(InvalidKeyError):
        kem.decapsulate(alg, pair.private_seed[:32], ct)
    with pytest.raises(InvalidKeyError):
        kem.generate(alg, b"\x00" * 63)


@pytest.mark.parametrize("alg", SIGS)
def test_signature_round_trip_and_sizes(sig: SignatureProvider, alg: SignatureAlgorithm) -> None:
    pair = sig.generate(alg)
    message = b"ledger entry 42"
    for context in (b"", b"qkms/kme-to-kme", b"c" * 255):
        signature = sig.sign(alg, pair.private_seed, message, context)
        assert len(signature) == FIPS204_TABLE2[alg][2]
        assert len(pair.public_key) == FIPS204_TABLE2[alg][1]
        assert sig.verify(alg, pair.public_key, message, signature, context) is True


@pytest.mark.parametrize("alg", SIGS)
def test_signature_tampering_fails_without_raising(sig: SignatureProvider, alg: SignatureAlgorithm) -> None:
    pair = sig.generate(alg)
    message, context = b"ledger entry 42", b"qkms"
    signature = sig.sign(alg, pair.private_seed, message, context)
    flipped = bytearray(signature)
    flipped[len(flipped) // 2] ^= 0x01
    other = sig.generate(alg)
    assert sig.verify(alg, pair.public_key, message + b"3", signature, context) is False
    assert sig.verify(alg, pair.public_key, message, bytes(flipped), context) is False
    assert sig.verify(alg, pair.public_key, message, signature, b"qkmz") is False
    assert sig.verify(alg, pair.public_key, message, signature, b"") is False
    assert sig.verify(alg, pair.public_key, message, signature[:-1], context) is False
    assert sig.verify(alg, pair.public_key, message, signature + b"\x00", context) is False
    assert sig.verify(alg, pair.public_key, message, b"", context) is False
    assert sig.verify(alg, pair.public_key, message, signature, b"x" * 256) is False
    assert sig.verify(alg, other.public_key, message, signature, context) is False


@pytest.mark.parametrize("alg", SIGS)
def test_signature_seed_reproduces_key(sig: SignatureProvider, alg: SignatureAlgorithm) -> None:
    seed = os.urandom(32)
    pair = sig.generate(alg, seed)
    assert sig.generate(alg, seed) == pair
    assert sig.public_key_from_seed(alg, seed) == pair.public_key
    assert sig.public_key_from_seed(alg, os.urandom(32)) != pair.public_key
    # Signing is hedged, so two signatures differ, but both verify under the re-derived key.
    one, two = sig.sign(alg, seed, b"m"), sig.sign(alg, seed, b"m")
    assert one != two
    assert sig.verify(alg, sig.public_key_from_seed(alg, seed), b"m", one)


@pytest.mark.parametrize("alg", SIGS)
def test_bound_signer_signs_like_sign(sig: SignatureProvider, alg: SignatureAlgorithm) -> None:
    pair = sig.generate(alg)
    bound = sig.signer(alg, pair.private_seed)
    for context in (b"", b"qkms/kme-to-kme"):
        signature = bound(b"ledger entry 42", context)
        assert sig.verify(alg, pair.public_key, b"ledger entry 42", signature, context) is True
        assert sig.verify(alg, pair.public_key, b"ledger entry 43", signature, context) is False
    with pytest.raises(PqcError):
        bound(b"m", b"x" * 256)
    with pytest.raises(InvalidKeyError):
        sig.signer(alg, pair.private_seed + b"\x00")


@pytest.mark.parametrize("alg", SIGS)
def test_signature_rejects_malformed_input(sig: SignatureProvider, alg: SignatureAlgorithm) -> None:
    pair = sig.generate(alg)
    with pytest.raises(PqcError):
        sig.sign(alg, pair.private_seed, b"m", b"x" * 256)
    with pytest.raises(InvalidKeyError):
        sig.sign(alg, pair.private_seed + b"\x00", b"m")
    with pytest.raises(InvalidKeyError):
        sig.verify(alg, pair.public_key[:-1], b"m", b"\x00" * FIPS204_TABLE2[alg][2])


def test_unknown_algorithms_are_refused(kem: KemProvider, sig: SignatureProvider) -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        kem.generate("ML-KEM-512")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedAlgorithmError):
        sig.generate("Dilithium3")  # type: ignore[arg-type]


def test_string_algorithm_names_are_accepted(kem: KemProvider) -> None:
    pair = kem.generate("ML-KEM-768")  # type: ignore[arg-type]
    assert pair.algorithm is KemAlgorithm.ML_KEM_768


def test_private_bytes_never_in_repr_or_errors() -> None:
    seed = bytes(range(64))
    kem = get_kem_provider()
    pair = kem.generate(KemAlgorithm.ML_KEM_768, seed)
    for text in (repr(pair), str(pair)):
        assert "private_seed" not in text
        assert seed.hex() not in text and repr(seed) not in text
        assert seed.hex()[:16] not in text
    sig_seed = bytes(range(100, 132))
    sig_pair = get_signature_provider().generate(SignatureAlgorithm.ML_DSA_65, sig_seed)
    assert sig_seed.hex()[:16] not in repr(sig_pair) and "private_seed" not in repr(sig_pair)
    with pytest.raises(InvalidKeyError) as info:
        kem.decapsulate(KemAlgorithm.ML_KEM_768, seed[:40], b"\x00" * 1088)
    assert seed[:40].hex()[:8] not in str(info.value) and "40" in str(info.value)
    with pytest.raises(InvalidKeyError) as info2:
        KemKeyPair(KemAlgorithm.ML_KEM_768, pair.public_key, seed[:10])
    assert seed[:10].hex() not in str(info2.value)


def test_key_pairs_are_frozen_and_compare_on_public_parts() -> None:
    pair = get_signature_provider().generate(SignatureAlgorithm.ML_DSA_44)
    with pytest.raises(AttributeError):
        pair.public_key = b""  # type: ignore[misc]
    twin = SignatureKeyPair(pair.algorithm, pair.public_key, pair.private_seed)
    assert twin == pair and hash(twin) == hash(pair)
    with pytest.raises(InvalidKeyError):
        SignatureKeyPair(pair.algorithm, pair.public_key[:-1], pair.private_seed)
