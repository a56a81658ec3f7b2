"""ML-DSA authentication of the simulated link's classical channel: tampering aborts the block."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kms.crypto.channel_auth import (
    HandshakeError,
    MlDsaMessageAuthenticator,
    PqSessionAuthenticator,
    device_authenticator,
)
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.crypto.pqc.registry import get_kem_provider, get_signature_provider
from qkd_adapters.sim.params import load_preset
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block
from qkd_adapters.sim.pipeline import run_postprocessing
from qkd_adapters.sim.postproc.channel import ChannelAuthenticationError, ClassicalChannel, Message

SIGNER = get_signature_provider()
ALICE = SIGNER.generate(SignatureAlgorithm.ML_DSA_65)
BOB = SIGNER.generate(SignatureAlgorithm.ML_DSA_65)


def _session(**kw: object) -> PqSessionAuthenticator:
    args: dict[str, object] = {
        "alice": ALICE,
        "bob_public_key": BOB.public_key,
        "bob": BOB,
        "alice_public_key": ALICE.public_key,
        "context": b"qkms-link/test",
    }
    args.update(kw)
    return PqSessionAuthenticator(SIGNER, get_kem_provider(), **args)  # type: ignore[arg-type]


def _flip_payload(msg: Message) -> Message:
    if msg.kind != "cascade" and msg.seq < 3:
        return msg
    return dataclasses.replace(
        msg, payload=bytes([msg.payload[0] ^ 1]) + msg.payload[1:] if msg.payload else b"x"
    )


@pytest.mark.parametrize("make", [_session, lambda: MlDsaMessageAuthenticator(SIGNER, ALICE, BOB)])
def test_messages_round_trip_and_tampering_fails(make) -> None:  # type: ignore[no-untyped-def]
    channel = ClassicalChannel(make())
    assert channel.send("alice", "hello", b"payload") == b"payload"
    assert channel.send("bob", "reply", b"answer") == b"answer"
    channel.tamper = lambda m: dataclasses.replace(m, payload=m.payload + b"!")
    with pytest.raises(ChannelAuthenticationError):
        channel.send("alice", "parities", b"0101")


def test_per_message_signature_from_an_impostor_fails() -> None:
    mallory = SIGNER.generate(SignatureAlgorithm.ML_DSA_65)
    # Mallory signs Bob's messages with her key; Alice checks them against Bob's pinned public key.
    impostor_bob = dataclasses.replace(BOB, private_seed=mallory.private_seed)
    channel = ClassicalChannel(MlDsaMessageAuthenticator(SIGNER, ALICE, impostor_bob))
    assert channel.send("alice", "hello", b"x") == b"x"
    with pytest.raises(ChannelAuthenticationError):
        channel.send("bob", "reply", b"y")


def test_impostor_fails_the_handshake() -> None:
    mallory = SIGNER.generate(SignatureAlgorithm.ML_DSA_65)
    with pytest.raises(HandshakeError, match="Alice"):
        _session(alice=mallory)  # Bob has Alice's real key pinned
    with pytest.raises(HandshakeError, match="Bob"):
        _session(bob=mallory)


def test_session_rekeys_and_old_tags_stop_verifying() -> None:
    auth = _session(rekey_after=2)
    tags = [auth.sign(b"\x00" * 8 + b"\x00m%d" % i) for i in range(3)]
    assert auth.epoch == 1
    assert not auth.verify(b"\x00" * 8 + b"\x00m0", tags[0])
    assert auth.verify(b"\x00" * 8 + b"\x00m2", tags[2])


def test_tampered_postprocessing_message_aborts_the_block() -> None:
    params = load_preset("gys", clock_rate_hz=1e9, length_km=25.0)
    block = simulate_bb84_block(params, 1_000_000_000, np.random.default_rng(7))
    clean = run_postprocessing(
        block,
        params,
        ClassicalChannel(device_authenticator("ml-dsa-session", "L")),
        np.random.default_rng(1),
        params.eps_sec,
        params.eps_cor,
    )
    assert clean.alarm is None and clean.final_bits > 0
    assert np.array_equal(clean.alice_key, clean.bob_key)  # type: ignore[arg-type]
    tampered = ClassicalChannel(device_authenticator("ml-dsa-session", "L"), tamper=_flip_payload)
    result = run_postprocessing(
        block, params, tampered, np.random.default_rng(1), params.eps_sec, params.eps_cor
    )
    assert result.final_bits == 0 and result.alice_key is None
    assert result.alarm is not None and "auth" in result.alarm


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="channel_auth"):
        device_authenticator("none", "L")
