"""The classical channel: counting, authentication, tampering."""

from __future__ import annotations

import dataclasses

import pytest

from qkd_adapters.sim.postproc.channel import (
    Authenticator,
    ChannelAuthenticationError,
    ClassicalChannel,
    HmacAuthenticator,
    Message,
)


def test_counts_messages_bits_and_leak_per_direction() -> None:
    ch = ClassicalChannel(HmacAuthenticator(b"k" * 32))
    assert ch.send("alice", "a", b"\x01\x02", leaked_bits=5) == b"\x01\x02"
    ch.send("bob", "b", b"\x03")
    assert ch.stats["alice"].messages == 1 and ch.stats["alice"].payload_bits == 16
    assert ch.stats["alice"].tag_bits == 256 and ch.stats["bob"].payload_bits == 8
    assert ch.leaked_bits == 5 and ch.leaked_by_kind("a") == 5 and ch.messages == 2


def test_hmac_is_an_authenticator_and_rejects_forgeries() -> None:
    auth = HmacAuthenticator(b"s" * 32)
    assert isinstance(auth, Authenticator)
    tag = auth.sign(b"payload")
    assert auth.verify(b"payload", tag) and not auth.verify(b"payload!", tag)
    assert "s" * 8 not in repr(auth)


def test_tampered_payload_raises() -> None:
    def flip(msg: Message) -> Message:
        return dataclasses.replace(msg, payload=bytes([msg.payload[0] ^ 1]) + msg.payload[1:])

    ch = ClassicalChannel(HmacAuthenticator(b"k" * 32), tamper=flip)
    with pytest.raises(ChannelAuthenticationError) as err:
        ch.send("alice", "cascade/reply", b"\x00secret-free")
    assert "secret" not in str(err.value)


def test_replayed_message_with_old_sequence_fails() -> None:
    recorded: list[Message] = []

    def replay(msg: Message) -> Message:
        recorded.append(msg)
        return recorded[0]

    ch = ClassicalChannel(HmacAuthenticator(b"k" * 32), tamper=replay)
    ch.send("alice", "x", b"first")
    with pytest.raises(ChannelAuthenticationError):
        ch.send("alice", "x", b"second")
