"""Toeplitz privacy amplification: the FFT product is exact; lengths are honoured."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel
from qkd_adapters.sim.postproc.privacy_amplification import (
    PrivacyAmplificationError,
    amplify,
    toeplitz_hash,
    toeplitz_matrix,
)


def _direct(x: np.ndarray, seed: np.ndarray, m: int) -> U8Array:
    return ((toeplitz_matrix(seed, x.shape[0], m).astype(np.int64) @ x.astype(np.int64)) % 2).astype(np.uint8)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), m_frac=st.floats(0.01, 1.0), data=st.data())
def test_fft_equals_direct_matrix_product(n: int, m_frac: float, data: st.DataObject) -> None:
    m = max(1, int(n * m_frac))
    seed_int = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed_int)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    expected = _direct(x, seed, m)
    assert np.array_equal(toeplitz_hash(x, seed, m), expected)
    assert np.array_equal(toeplitz_hash(x, seed, m, chunk_bits=max(1, n // 3)), expected)


def test_exact_on_all_ones_worst_case() -> None:
    n, m = 3000, 2000  # every convolution value at its maximum: the float rounding worst case
    x = np.ones(n, dtype=np.uint8)
    seed = np.ones(n + m - 1, dtype=np.uint8)
    assert np.array_equal(toeplitz_hash(x, seed, m), _direct(x, seed, m))


def test_large_block_chunked_and_unchunked_agree() -> None:
    rng = np.random.default_rng(9)
    n, m = 200_000, 50_000
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    assert np.array_equal(toeplitz_hash(x, seed, m), toeplitz_hash(x, seed, m, chunk_bits=65_536))


def test_amplify_output_length_and_equality() -> None:
    rng = np.random.default_rng(3)
    key = rng.integers(0, 2, 5000, dtype=np.uint8)
    ch = ClassicalChannel()
    ka, kb = amplify(key, key.copy(), 1234, ch, rng)
    assert ka.shape == (1234,) and np.array_equal(ka, kb)
    assert ch.leaked_bits == 0 and ch.stats["alice"].payload_bits >= 5000 + 1233
    with pytest.raises(PrivacyAmplificationError):
        amplify(key, key, 5001, ClassicalChannel(), rng)
