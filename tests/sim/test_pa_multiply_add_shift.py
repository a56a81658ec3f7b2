"""Multiply-add-shift privacy amplification: exact strong universality at toy sizes, agreement with
plain Python integers at random sizes, and refusal of malformed seeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.pa_bits import PrivacyAmplificationError
from qkd_adapters.sim.postproc.pa_multiply_add_shift import (
    mas_int,
    multiply_add_shift_hash,
    seed_bits,
    word_bits,
)


def _bits(value: int, width: int) -> U8Array:
    return (
        np.array([int(c) for c in format(value, f"0{width}b")], dtype=np.uint8)
        if width
        else np.zeros(0, np.uint8)
    )


def _pack(bit_string: str) -> bytes:
    """Bits MSB first, zero-padded to whole bytes, written without numpy (an independent packer)."""
    padded = bit_string + "0" * ((-len(bit_string)) % 8)
    return bytes(int(padded[i : i + 8], 2) for i in range(0, len(padded), 8))


def _seed(a: int, b: int, u: int) -> bytes:
    return _pack(format(a, f"0{u}b") + format(b, f"0{u}b"))


def _value(bits: U8Array) -> int:
    return int("".join(str(int(v)) for v in bits), 2)


def _table(n: int, m: int) -> np.ndarray:
    """h_{a,b}(x) for every seed (rows) and every n-bit input (columns), through the public API."""
    u = word_bits(n, m)
    inputs = [_bits(x, n) for x in range(2**n)]
    rows = []
    for a in range(2**u):
        for b in range(2**u):
            seed = _seed(a, b, u)
            rows.append([_value(multiply_add_shift_hash(x, seed, m)) for x in inputs])
    return np.array(rows, dtype=np.int64)


def _joint_counts(table: np.ndarray, m: int) -> dict[tuple[int, int], np.ndarray]:
    """For each pair of distinct inputs, how many seeds map it to each output pair (q, r)."""
    return {
        (x, y): np.bincount(table[:, x] * 2**m + table[:, y], minlength=4**m)
        for x in range(table.shape[1])
        for y in range(x + 1, table.shape[1])
    }


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (4, 2), (4, 3)])
def test_exhaustive_strong_universality(n: int, m: int) -> None:
    # Every pair of distinct inputs, every seed: each of the 2^(2m) output pairs is hit by exactly
    # 2^(2u - 2m) of the 2^(2u) seeds, so collisions number exactly 2^(2u - m) (probability 2^-m).
    u = word_bits(n, m)
    table = _table(n, m)
    assert table.shape == (2 ** (2 * u), 2**n)
    for pair, counts in _joint_counts(table, m).items():
        assert (counts == 2 ** (2 * u - 2 * m)).all(), pair
        collisions = int(np.count_nonzero(table[:, pair[0]] == table[:, pair[1]]))
        assert collisions == 2 ** (2 * u - m), pair


def test_a_word_one_bit_too_short_is_not_universal() -> None:
    # The same exhaustive count with u = n + m - 2 finds the pair differing in the top bit colliding
    # twice as often: the check above can fail, and u >= n + m - 1 is needed.
    n, m = 3, 2
    u = n + m - 2
    table = np.array(
        [[int(mas_int(a, b, u, x, m)) for x in range(2**n)] for a in range(2**u) for b in range(2**u)],
        dtype=np.int64,
    )
    worst = max(
        int(np.count_nonzero(table[:, x] == table[:, y])) for x in range(2**n) for y in range(x + 1, 2**n)
    )
    assert worst == 2 ** (2 * u - m + 1)


def _reference(x: U8Array, seed: bytes, m: int) -> U8Array:
    """The definition on Python integers: no gmpy2, no numpy packing."""
    n = int(x.shape[0])
    u = n + m - 1
    bit_string = "".join(format(byte, "08b") for byte in seed)[: 2 * u]
    a, b = int(bit_string[:u], 2), int(bit_string[u:], 2)
    big_x = int("".join("1" if v else "0" for v in x), 2)
    return _bits(((a * big_x + b) % (1 << u)) >> (u - m), m)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), m_frac=st.floats(0.0, 1.0), draw=st.integers(0, 2**32 - 1))
def test_agrees_with_python_big_integers(n: int, m_frac: float, draw: int) -> None:
    m = max(1, min(n, round(n * m_frac)))
    rng = np.random.default_rng(draw)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = _pack("".join(str(v) for v in rng.integers(0, 2, seed_bits(n, m))))
    assert np.array_equal(multiply_add_shift_hash(x, seed, m), _reference(x, seed, m))


@pytest.mark.parametrize(("n", "m"), [(65_537, 20_011), (200_003, 200_003), (123_457, 1)])
def test_agrees_with_python_big_integers_on_large_blocks(n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = np.packbits(rng.integers(0, 2, seed_bits(n, m), dtype=np.uint8)).tobytes()
    got = multiply_add_shift_hash(x, seed, m)
    assert got.shape == (m,) and got.dtype == np.uint8
    assert np.array_equal(got, _reference(x, seed, m))


def test_extreme_inputs() -> None:
    n, m = 1000, 400
    u = word_bits(n, m)
    ones, zeros = np.ones(n, np.uint8), np.zeros(n, np.uint8)
    all_ones_seed = _seed(2**u - 1, 2**u - 1, u)
    for x in (ones, zeros):
        assert np.array_equal(multiply_add_shift_hash(x, all_ones_seed, m), _reference(x, all_ones_seed, m))
    # a = 0: the hash is the top of b whatever the input (a legitimate, if unlucky, seed)
    b_only = _seed(0, 2 ** (u - 1), u)
    assert _value(multiply_add_shift_hash(ones, b_only, m)) == 2 ** (m - 1)


@pytest.mark.parametrize(
    ("delta", "set_padding", "reason"),
    [(-1, False, "seed must be"), (1, False, "seed must be"), (0, True, "padding bits set")],
)
def test_malformed_seed_is_refused(delta: int, set_padding: bool, reason: str) -> None:
    n, m = 1001, 500  # 2u = 3000 bits: 375 bytes, no padding; use n = 1002 for 4 padding bits
    n = n + 1 if set_padding else n
    bits = seed_bits(n, m)
    seed = bytearray(np.packbits(np.ones(bits, dtype=np.uint8)).tobytes())
    if set_padding:
        assert bits % 8
        seed[-1] |= 1
    if delta < 0:
        seed = seed[:delta]
    elif delta > 0:
        seed += b"\0" * delta
    with pytest.raises(PrivacyAmplificationError, match=reason) as err:
        multiply_add_shift_hash(np.ones(n, np.uint8), bytes(seed), m)
    assert "\n" not in str(err.value) and "multiply-add-shift" in str(err.value)


@pytest.mark.parametrize(("n", "m"), [(0, 1), (10, 0), (10, 11), (10, -1)])
def test_impossible_lengths_are_refused(n: int, m: int) -> None:
    with pytest.raises(PrivacyAmplificationError, match="length"):
        multiply_add_shift_hash(np.ones(n, np.uint8), b"", m)
