"""Verification: a residual error after reconciliation is caught; tags count as leak."""

from __future__ import annotations

import numpy as np
import pytest

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel
from qkd_adapters.sim.postproc.verification import (
    MERSENNE_61,
    TAG_BITS,
    VerificationError,
    hashes_needed,
    poly_hash,
    verify_keys,
)


def _reference_hash(key: U8Array, r: int) -> int:
    packed = np.packbits(key)
    packed = np.concatenate((packed, np.zeros((-packed.shape[0]) % 4, np.uint8)))
    h = int(key.shape[0])
    for word in packed.view(">u4"):
        h = (h * r + int(word)) % MERSENNE_61
    return h


def test_hash_matches_python_big_integers() -> None:
    rng = np.random.default_rng(5)
    for n in (1, 31, 32, 33, 1000):
        key = rng.integers(0, 2, n, dtype=np.uint8)
        r = int(rng.integers(0, MERSENNE_61))
        assert poly_hash(key, r) == _reference_hash(key, r)


def test_equal_keys_pass_and_leak_is_tag_bits() -> None:
    rng = np.random.default_rng(1)
    key = rng.integers(0, 2, 100000, dtype=np.uint8)
    ch = ClassicalChannel()
    res = verify_keys(key, key.copy(), ch, rng, 1e-15)
    assert res.leaked_bits == res.hashes * TAG_BITS == ch.leaked_bits
    assert res.collision_bound <= 1e-15


@pytest.mark.parametrize("position", [0, 31, 32, 99999])
def test_single_residual_error_is_detected(position: int) -> None:
    rng = np.random.default_rng(position)
    key = rng.integers(0, 2, 100000, dtype=np.uint8)
    bad = key.copy()
    bad[position] ^= 1
    with pytest.raises(VerificationError):
        verify_keys(key, bad, ClassicalChannel(), rng, 1e-15)


def test_number_of_hashes_reaches_eps_cor() -> None:
    assert hashes_needed(10**6, 1e-15) == 2
    assert hashes_needed(10**6, 1e-9) == 1
