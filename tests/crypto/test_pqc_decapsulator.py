"""A bound decapsulator behaves exactly like ``decapsulate`` with the same seed."""

from __future__ import annotations

import pytest

from kms.crypto.pqc.base import KEM_SIZES, InvalidCiphertextError, KemAlgorithm
from kms.crypto.pqc.registry import get_kem_provider


@pytest.mark.parametrize("alg", list(KemAlgorithm))
def test_decapsulator_matches_decapsulate(alg: KemAlgorithm) -> None:
    kem = get_kem_provider()
    pair = kem.generate(alg)
    bound = kem.decapsulator(alg, pair.private_seed)
    for _ in range(3):
        ct, secret = kem.encapsulate(alg, pair.public_key)
        assert bound(ct) == secret == kem.decapsulate(alg, pair.private_seed, ct)
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    assert (
        bound(tampered) == kem.decapsulate(alg, pair.private_seed, tampered) != secret
    )  # implicit rejection
    with pytest.raises(InvalidCiphertextError):
        bound(b"\x00" * (KEM_SIZES[alg].ciphertext - 1))
