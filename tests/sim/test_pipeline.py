"""End-to-end post-processing: identical final keys, or an alarm and no key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qkd_adapters.sim.params import LinkParameters, load_preset
from qkd_adapters.sim.physics.bb84 import BB84Block, simulate_bb84_block
from qkd_adapters.sim.physics.eve import InterceptResend, PhotonNumberSplitting
from qkd_adapters.sim.pipeline import (
    ALARM_AUTHENTICATION,
    ALARM_NO_KEY,
    ALARM_QBER,
    ALARM_VERIFICATION,
    PostprocessConfig,
    run_postprocessing,
)
from qkd_adapters.sim.postproc import cascade
from qkd_adapters.sim.postproc.channel import ClassicalChannel, HmacAuthenticator, Message

PULSES = 10_000_000


@pytest.fixture(scope="module")
def params() -> LinkParameters:
    return load_preset("gys", clock_rate_hz=1e9, detector_efficiency=0.5, misalignment=0.01, length_km=10.0)


def _block(params: LinkParameters, seed: int, eve: object = None) -> BB84Block:
    return simulate_bb84_block(params, PULSES, np.random.default_rng(seed), eve)  # type: ignore[arg-type]


def test_both_ends_hold_identical_final_keys(params: LinkParameters) -> None:
    block = _block(params, 1)
    ch = ClassicalChannel(HmacAuthenticator(b"pipeline-test-key-000000"))
    res = run_postprocessing(block, params, ch, np.random.default_rng(2), 1e-10, 1e-15)
    assert res.ok, res.alarm_detail
    assert res.alice_key is not None and res.bob_key is not None
    assert np.array_equal(res.alice_key, res.bob_key)
    assert res.final_bits == res.alice_key.shape[0] > 0
    assert res.qber == pytest.approx(np.count_nonzero(block.alice_key != block.bob_key) / res.sifted_bits)
    assert res.leaked_bits == ch.leaked_bits  # the whole leak is what the channel saw
    assert res.finite_key is not None and res.finite_key.leak_ec_bits == res.leaked_bits
    assert 0 < res.pa_ratio < 1


def test_intercept_resend_aborts_on_qber(params: LinkParameters) -> None:
    res = run_postprocessing(
        _block(params, 3, InterceptResend(fraction=1.0)),
        params,
        ClassicalChannel(),
        np.random.default_rng(4),
        1e-10,
        1e-15,
    )
    assert res.alarm == ALARM_QBER and res.alice_key is None and res.final_bits == 0


def test_partial_intercept_resend_gives_no_key(params: LinkParameters) -> None:
    res = run_postprocessing(
        _block(params, 5, InterceptResend(fraction=0.3)),
        params,
        ClassicalChannel(),
        np.random.default_rng(6),
        1e-10,
        1e-15,
    )
    assert res.alarm in (ALARM_QBER, ALARM_NO_KEY) and res.alice_key is None


def test_pns_attack_is_caught_by_decoy_bounds() -> None:
    # GYS at 25 km, 1 GHz, 1 s: the honest link gives key; under PNS the decoy bounds find too
    # few single photons (Hwang 2003; Lo, Ma, Chen 2005) and the block is dropped.
    gys = load_preset("gys", clock_rate_hz=1e9, length_km=25.0)
    block = simulate_bb84_block(gys, 1_000_000_000, np.random.default_rng(7), PhotonNumberSplitting())
    res = run_postprocessing(block, gys, ClassicalChannel(), np.random.default_rng(8), 1e-10, 1e-15)
    assert res.alarm == ALARM_NO_KEY and res.alice_key is None
    assert res.reconciliation is None  # caught at parameter estimation, before any parity is sent


def test_tampered_message_aborts_the_block(params: LinkParameters) -> None:
    def tamper(msg: Message) -> Message:
        if msg.kind == "cascade/reply":
            return dataclasses.replace(msg, payload=msg.payload[:-1] + bytes([msg.payload[-1] ^ 0x80]))
        return msg

    ch = ClassicalChannel(HmacAuthenticator(b"pipeline-test-key-000000"), tamper=tamper)
    res = run_postprocessing(_block(params, 9), params, ch, np.random.default_rng(10), 1e-10, 1e-15)
    assert res.alarm == ALARM_AUTHENTICATION and res.alice_key is None
    assert res.alarm_detail is not None and "cascade/reply" in res.alarm_detail


def test_residual_error_after_reconciliation_fails_verification(
    params: LinkParameters, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cascade.reconcile

    def leaves_one_error(*args: object, **kwargs: object) -> object:
        corrected, result = real(*args, **kwargs)  # type: ignore[arg-type]
        corrected[len(corrected) // 2] ^= 1
        return corrected, result

    monkeypatch.setattr("qkd_adapters.sim.pipeline.reconcile", leaves_one_error)
    res = run_postprocessing(
        _block(params, 11), params, ClassicalChannel(), np.random.default_rng(12), 1e-10, 1e-15
    )
    assert res.alarm == ALARM_VERIFICATION and res.alice_key is None


def test_qber_threshold_is_configurable(params: LinkParameters) -> None:
    res = run_postprocessing(
        _block(params, 13),
        params,
        ClassicalChannel(),
        np.random.default_rng(14),
        1e-10,
        1e-15,
        PostprocessConfig(qber_threshold=0.001),
    )
    assert res.alarm == ALARM_QBER
