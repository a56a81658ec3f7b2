"""Privacy amplification: the Toeplitz reference family (exact FFT, exhaustive universality), the seed
exchange between the two ends for every family, and the PA entry of a block's provenance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd_adapters.keyblock import KeyBlock
from qkd_adapters.sim.link import SimulatedLink
from qkd_adapters.sim.params import LinkParameters, load_preset
from qkd_adapters.sim.physics.bb84 import BB84Block, simulate_bb84_block
from qkd_adapters.sim.pipeline import (
    ALARM_AUTHENTICATION,
    ALARM_PRIVACY_AMPLIFICATION,
    PostprocessConfig,
    run_postprocessing,
)
from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel, HmacAuthenticator, Message
from qkd_adapters.sim.postproc.pa_bits import seed_bytes
from qkd_adapters.sim.postproc.pa_toeplitz import toeplitz_hash_packed
from qkd_adapters.sim.postproc.privacy_amplification import (
    FAMILIES,
    SEED_KIND,
    PrivacyAmplificationError,
    amplify,
    decode_seed_message,
    describe,
    draw_seed,
    encode_seed_message,
    hash_key,
    seed_bits,
    toeplitz_hash,
    toeplitz_matrix,
)

FAMILY_NAMES = sorted(FAMILIES)
HEADER_BYTES = 1 + 32 + 8 + 8


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


def test_toeplitz_exhaustive_universality() -> None:
    # n = 4, m = 3: all 2^6 seeds, every pair of distinct inputs collides under exactly 2^(6 - 3).
    n, m = 4, 3
    k = n + m - 1
    inputs = [np.array([(x >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.uint8) for x in range(2**n)]
    table = np.array(
        [
            [int(np.packbits(toeplitz_hash_packed(x, bytes([s << (8 - k)]), m))[0]) for x in inputs]
            for s in range(2**k)
        ]
    )
    for x in range(2**n):
        for y in range(x + 1, 2**n):
            assert int(np.count_nonzero(table[:, x] == table[:, y])) == 2 ** (k - m), (x, y)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), m_frac=st.floats(0.01, 1.0), draw=st.integers(0, 2**32 - 1))
def test_toeplitz_packed_seed_is_the_dense_matrix(n: int, m_frac: float, draw: int) -> None:
    # the cross-check path: the packed-seed entry point reads seed bit k as diagonal k
    m = max(1, int(n * m_frac))
    rng = np.random.default_rng(draw)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = draw_seed("toeplitz", n, m, rng.bytes)
    diagonals = np.unpackbits(np.frombuffer(seed, dtype=np.uint8), count=n + m - 1)
    assert np.array_equal(hash_key("toeplitz", x, seed, m), _direct(x, diagonals, m))


def _key(n: int, seed: int = 3) -> U8Array:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_both_ends_identical_and_the_seed_is_public_traffic(family: str) -> None:
    key, m = _key(5003), 1234
    ch = ClassicalChannel(record=True)
    ka, kb = amplify(key, key.copy(), m, ch, family=family)
    assert ka.shape == (m,) and ka.dtype == np.uint8 and np.array_equal(ka, kb)
    assert 0.4 < float(ka.mean()) < 0.6
    assert ch.leaked_bits == 0  # independent of the key: traffic, not leak
    (msg,) = [msg for msg in ch.log if msg.kind == SEED_KIND]
    assert len(msg.payload) == HEADER_BYTES + seed_bytes(seed_bits(family, 5003, m))
    again, _ = amplify(key, key.copy(), m, ClassicalChannel(), family=family)
    assert not np.array_equal(ka, again)  # a fresh CSPRNG seed per block


def _rewrite_seed(edit: object) -> ClassicalChannel:
    def tamper(msg: Message) -> Message:
        if msg.kind == SEED_KIND:
            return dataclasses.replace(msg, payload=edit(msg.payload))  # type: ignore[operator]
        return msg

    return ClassicalChannel(tamper=tamper)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bob_hashes_with_the_seed_he_received(family: str) -> None:
    key = _key(4000)
    flip = _rewrite_seed(lambda p: p[:HEADER_BYTES] + bytes([p[HEADER_BYTES] ^ 0x80]) + p[HEADER_BYTES + 1 :])
    ka, kb = amplify(key, key.copy(), 1500, flip, family=family)
    assert not np.array_equal(ka, kb)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("edit", [lambda p: p[:-1], lambda p: p + b"\0", lambda p: p[:HEADER_BYTES]])
def test_a_seed_of_the_wrong_length_is_refused(family: str, edit: object) -> None:
    key = _key(4000)
    with pytest.raises(PrivacyAmplificationError, match=r"seed must be \d+ bytes") as err:
        amplify(key, key.copy(), 1500, _rewrite_seed(edit), family=family)
    assert "\n" not in str(err.value)


def test_a_seed_for_another_family_or_other_lengths_is_refused() -> None:
    n, m = 4000, 1500
    seed = draw_seed("toeplitz", n, m)
    message = encode_seed_message("toeplitz", n, m, seed)
    with pytest.raises(PrivacyAmplificationError, match="seed is for family 'toeplitz'"):
        decode_seed_message(message, "multiply-add-shift", n, m)
    with pytest.raises(PrivacyAmplificationError, match="seed is for n = 4000, m = 1500"):
        decode_seed_message(message, "toeplitz", n, m + 1)
    garbled = message[:1] + b"toe\nplitz".ljust(32, b"\0") + message[33:]
    with pytest.raises(PrivacyAmplificationError, match="seed is for family '746f65") as err:
        decode_seed_message(garbled, "toeplitz", n, m)
    assert "\n" not in str(err.value)
    with pytest.raises(PrivacyAmplificationError, match="shorter than its header"):
        decode_seed_message(message[:10], "toeplitz", n, m)
    assert decode_seed_message(message, "toeplitz", n, m) == seed
    with pytest.raises(PrivacyAmplificationError, match="unknown privacy-amplification family 'sha-256'"):
        amplify(_key(n), _key(n), m, ClassicalChannel(), family="sha-256")


def test_seed_draw_clears_padding_and_checks_its_source() -> None:
    n, m = 1001, 2  # multiply-add-shift: 2u = 2004 bits, 4 padding bits
    seed = draw_seed("multiply-add-shift", n, m, lambda k: b"\xff" * k)
    assert len(seed) == 251 and seed[-1] == 0xF0
    assert hash_key("multiply-add-shift", np.ones(n, np.uint8), seed, m).shape == (m,)
    with pytest.raises(PrivacyAmplificationError, match="padding bits set"):
        hash_key("multiply-add-shift", np.ones(n, np.uint8), seed[:-1] + b"\xf1", m)
    with pytest.raises(PrivacyAmplificationError, match="wrong number of bytes"):
        draw_seed("multiply-add-shift", n, m, lambda k: b"\xff" * (k - 1))


@pytest.mark.parametrize("m", [0, 5001, -3])
def test_final_length_outside_the_key_is_refused(m: int) -> None:
    with pytest.raises(PrivacyAmplificationError, match=r"final length must lie in \(0, n\]"):
        amplify(_key(5000), _key(5000), m, ClassicalChannel())


@pytest.fixture(scope="module")
def link_params() -> LinkParameters:
    return load_preset("gys", clock_rate_hz=1e9, detector_efficiency=0.5, misalignment=0.01, length_km=10.0)


@pytest.fixture(scope="module")
def block(link_params: LinkParameters) -> BB84Block:
    return simulate_bb84_block(link_params, 10_000_000, np.random.default_rng(21), None)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pipeline_amplifies_with_the_configured_family(
    family: str, link_params: LinkParameters, block: BB84Block
) -> None:
    cfg = PostprocessConfig(pa_family=family)
    res = run_postprocessing(
        block, link_params, ClassicalChannel(), np.random.default_rng(2), 1e-10, 1e-15, cfg
    )
    assert res.ok and res.alice_key is not None and res.bob_key is not None
    assert np.array_equal(res.alice_key, res.bob_key) and res.alice_key.shape == (res.final_bits,)
    assert res.privacy_amplification == describe(family, res.sifted_bits, res.final_bits)
    expected_seed = (2 if family == "multiply-add-shift" else 1) * (res.sifted_bits + res.final_bits - 1)
    assert res.privacy_amplification["seed_bits"] == expected_seed


def test_pipeline_aborts_on_a_bad_seed(link_params: LinkParameters, block: BB84Block) -> None:
    truncate = _rewrite_seed(lambda p: p[:-1])
    res = run_postprocessing(block, link_params, truncate, np.random.default_rng(2), 1e-10, 1e-15)
    assert res.alarm == ALARM_PRIVACY_AMPLIFICATION and res.alice_key is None and res.bob_key is None
    assert res.alarm_detail is not None and "seed must be" in res.alarm_detail and res.final_bits == 0

    def flip(msg: Message) -> Message:
        payload = msg.payload[:-1] + bytes([msg.payload[-1] ^ 1]) if msg.kind == SEED_KIND else msg.payload
        return dataclasses.replace(msg, payload=payload)

    signed = ClassicalChannel(HmacAuthenticator(b"pa-test-key-0000000000000"), tamper=flip)
    res = run_postprocessing(block, link_params, signed, np.random.default_rng(2), 1e-10, 1e-15)
    assert res.alarm == ALARM_AUTHENTICATION and res.alice_key is None
    assert res.alarm_detail is not None and SEED_KIND in res.alarm_detail


def test_unknown_family_is_refused_at_configuration() -> None:
    with pytest.raises(ValueError, match="unknown privacy-amplification family 'md5'"):
        PostprocessConfig(pa_family="md5")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_block_provenance_names_the_family(family: str, link_params: LinkParameters) -> None:
    link = SimulatedLink(
        "sim-pa", link_params, distance_km=10.0, pulses_per_block=10_000_000, seed=5,
        postprocess=PostprocessConfig(pa_family=family), autostart=False,
    )  # fmt: skip
    try:
        alice, bob = link.produce_block()
    finally:
        link.close()
    assert isinstance(alice, KeyBlock) and isinstance(bob, KeyBlock) and alice.material == bob.material
    pa = alice.provenance.details["privacy_amplification"]
    assert pa["family"] == family and pa["output_bits"] == alice.bit_length
    assert pa["input_bits"] == alice.provenance.details["sifted_bits"] and pa["seed_source"] == "csprng"
    assert json.loads(json.dumps(alice.provenance.to_json()))["details"]["privacy_amplification"] == pa


def test_the_seed_comes_from_the_csprng_not_the_simulation_seed(link_params: LinkParameters) -> None:
    # Two links with the same simulation seed run the same physics and reconciliation, so the same
    # final length; the amplification seed is drawn fresh from the OS CSPRNG, so the keys differ.
    blocks = []
    for _ in range(2):
        link = SimulatedLink(
            "sim-pa-seed", link_params, distance_km=10.0, pulses_per_block=10_000_000, seed=7, autostart=False
        )
        try:
            blocks.append(link.produce_block()[0])
        finally:
            link.close()
    first, second = blocks
    assert isinstance(first, KeyBlock) and isinstance(second, KeyBlock)
    assert first.bit_length == second.bit_length > 0
    assert first.provenance.details["sifted_bits"] == second.provenance.details["sifted_bits"]
    assert first.material != second.material


def test_a_kme_link_option_chooses_the_family() -> None:
    # [links.options] pa_family = "toeplitz" reaches the link (whose blocks then name it: the
    # provenance test above); an unknown family is a ConfigError
    from kms.config import ConfigError, LinkSection
    from kms.runtime.sources import build_source

    options = {"seed": 5, "autostart": False}
    link = build_source(
        LinkSection(id="L-pa", source="simulated", options={**options, "pa_family": "toeplitz"})
    )
    try:
        assert isinstance(link, SimulatedLink) and link.postprocess.pa_family == "toeplitz"
    finally:
        link.close()
    default = build_source(LinkSection(id="L-pa", source="simulated", options=options))
    try:
        assert isinstance(default, SimulatedLink) and default.postprocess.pa_family == "multiply-add-shift"
    finally:
        default.close()
    with pytest.raises(ConfigError, match="unknown privacy-amplification family 'md5'"):
        build_source(LinkSection(id="L-pa", source="simulated", options={**options, "pa_family": "md5"}))
