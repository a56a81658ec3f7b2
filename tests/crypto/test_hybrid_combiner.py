"""The hybrid combiner: both ends agree, every context field matters, and an independent HKDF agrees."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os

import pytest

from kms.crypto.hybrid import (
    LABEL_FALLBACK,
    LABEL_HYBRID,
    SALT,
    HybridContext,
    KeyDeriver,
    combine_hybrid,
    derive_fallback,
)


def _ctx() -> HybridContext:
    return HybridContext(
        suite="ML-KEM-768+QKD/HKDF-SHA-384",
        key_id="0d7b3f4e-7f7e-4a53-9c7e-3a0f4c6f2b11",
        master_kme_id="KME-A",
        slave_kme_id="KME-B",
        master_sae_id="SAE-1",
        slave_sae_id="SAE-2",
        kem_public_key=b"P" * 1184,
        kem_ciphertext=b"C" * 1088,
    )


def _independent_hkdf_sha384(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with the standard library only."""
    prk = hmac.new(salt, ikm, hashlib.sha384).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha384).digest()
        out += block
        counter += 1
    return out[:length]


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def _independent_context(ctx: HybridContext, length: int) -> bytes:
    parts = [
        ctx.suite.encode(),
        ctx.key_id.encode(),
        ctx.master_kme_id.encode(),
        ctx.slave_kme_id.encode(),
        ctx.master_sae_id.encode(),
        ctx.slave_sae_id.encode(),
        hashlib.sha384(ctx.kem_public_key).digest(),
        hashlib.sha384(ctx.kem_ciphertext).digest(),
        (length * 8).to_bytes(4, "big"),
    ]
    return b"".join(_lp(p) for p in parts)


def test_both_ends_derive_the_same_key() -> None:
    qkd, ss = os.urandom(32), os.urandom(32)
    assert combine_hybrid(qkd, ss, _ctx()) == combine_hybrid(bytes(qkd), bytes(ss), _ctx())
    assert len(combine_hybrid(qkd, ss, _ctx())) == 32
    assert len(combine_hybrid(os.urandom(128), ss, _ctx())) == 128


def test_matches_an_independent_hkdf() -> None:
    qkd, ss = os.urandom(64), os.urandom(32)
    ctx = _ctx()
    info = _lp(LABEL_HYBRID) + _independent_context(ctx, 64)
    assert combine_hybrid(qkd, ss, ctx) == _independent_hkdf_sha384(SALT, ss + qkd, info, 64)
    info_fb = _lp(LABEL_FALLBACK) + _independent_context(ctx, 48)
    assert derive_fallback(ss, ctx, 48) == _independent_hkdf_sha384(SALT, ss, info_fb, 48)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(HybridContext)])
def test_every_context_field_changes_the_key(field: str) -> None:
    qkd, ss = os.urandom(32), os.urandom(32)
    ctx = _ctx()
    value = getattr(ctx, field)
    changed = dataclasses.replace(ctx, **{field: value + (b"x" if isinstance(value, bytes) else "x")})
    assert combine_hybrid(qkd, ss, ctx) != combine_hybrid(qkd, ss, changed)
    assert derive_fallback(ss, ctx, 32) != derive_fallback(ss, changed, 32)


def test_each_input_and_the_length_change_the_key() -> None:
    qkd, ss = os.urandom(32), os.urandom(32)
    base = combine_hybrid(qkd, ss, _ctx())
    assert base != combine_hybrid(os.urandom(32), ss, _ctx())
    assert base != combine_hybrid(qkd, os.urandom(32), _ctx())
    assert combine_hybrid(qkd + b"\x00" * 16, ss, _ctx())[:32] != base  # length is bound, not truncated
    assert derive_fallback(ss, _ctx(), 32) != base  # hybrid and fallback are domain-separated


def test_length_prefixing_prevents_field_shifting() -> None:
    a = dataclasses.replace(_ctx(), master_sae_id="SAE-1X", slave_sae_id="SAE-2")
    b = dataclasses.replace(_ctx(), master_sae_id="SAE-1", slave_sae_id="XSAE-2")
    qkd, ss = os.urandom(32), os.urandom(32)
    assert combine_hybrid(qkd, ss, a) != combine_hybrid(qkd, ss, b)


def test_refuses_missing_inputs() -> None:
    with pytest.raises(ValueError):
        combine_hybrid(b"", os.urandom(32), _ctx())
    with pytest.raises(ValueError):
        derive_fallback(b"", _ctx(), 32)
    with pytest.raises(ValueError):
        derive_fallback(os.urandom(32), _ctx(), 0)


def test_one_deriver_per_request_gives_each_key_its_own_context() -> None:
    ss, ctx = os.urandom(32), _ctx()
    deriver = KeyDeriver(ss, dataclasses.replace(ctx, key_id="not used"))
    for key_id in ("01a20994-c169-7000-8d30-37e0a3124e1b", "01a20994-c169-7001-8d30-37e0a3124e1b"):
        one = dataclasses.replace(ctx, key_id=key_id)
        qkd = os.urandom(32)
        assert deriver.hybrid(qkd, key_id) == combine_hybrid(qkd, ss, one)
        assert deriver.fallback(key_id, 32) == derive_fallback(ss, one, 32)
        assert deriver.context(key_id, 32) == _independent_context(one, 32)
