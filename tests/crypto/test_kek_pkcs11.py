"""The KEK from a PKCS#11 token, against a real SoftHSM2 (docs/DECISIONS.md D-7)."""

from __future__ import annotations

import base64
import json
import os
import stat
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.types import WrapMixin

from kms.crypto.envelope import KEK_BYTES, Envelope, KekError, MaterialIntegrityError
from kms.crypto.kek_pkcs11 import (
    Pkcs11KekConfig,
    create_wrapping_key,
    load_kek_pkcs11,
    provision_wrapped_kek,
)
from tests.support.softhsm import SoftHsm, SoftHsmToken, softhsm_available, softhsm_required

PIN_ENV = "QKMS_TEST_PKCS11_PIN"


@pytest.fixture(scope="module")
def hsm() -> Iterator[SoftHsm]:
    ok, why = softhsm_available()
    if not ok:
        if softhsm_required():
            pytest.fail(f"SoftHSM2 is required (QKMS_REQUIRE_SOFTHSM=1) but unavailable: {why}")
        pytest.skip(f"SoftHSM2 not installed: {why}")
    with SoftHsm() as running:
        yield running


@pytest.fixture(scope="module")
def token(hsm: SoftHsm) -> SoftHsmToken:
    return hsm.init_token("qkms-kek")


@pytest.fixture
def cfg(token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pkcs11KekConfig:
    """A fresh key label and wrapped-KEK path per test, with the PIN in the environment."""
    monkeypatch.setenv(PIN_ENV, token.pin)
    return Pkcs11KekConfig(
        module=token.module,
        token_label=token.label,
        key_label=f"qkms-wrap-{uuid.uuid4().hex[:12]}",
        wrapped_kek_file=tmp_path / "kek.wrapped",
        pin_env=PIN_ENV,
    )


@pytest.fixture
def provisioned(cfg: Pkcs11KekConfig) -> tuple[Pkcs11KekConfig, bytes]:
    create_wrapping_key(cfg)
    provision_wrapped_kek(cfg)
    return cfg, load_kek_pkcs11(cfg)


def _secrets_absent(err: KekError, *secrets: str | bytes) -> None:
    """Neither the message nor anything in the chained traceback carries a secret."""
    rendered = "".join(traceback.format_exception(err))
    for secret in secrets:
        if isinstance(secret, bytes):
            forms = [secret.hex(), base64.b64encode(secret).decode(), repr(secret)]
        else:
            forms = [secret]
        for form in forms:
            assert form not in rendered


# --------------------------------------------------------------------------- happy path


def test_round_trip_gives_the_same_32_bytes(provisioned: tuple[Pkcs11KekConfig, bytes]) -> None:
    cfg, kek = provisioned
    assert isinstance(kek, bytes)
    assert len(kek) == KEK_BYTES
    assert load_kek_pkcs11(cfg) == kek
    assert load_kek_pkcs11(cfg) == kek


def test_each_provisioning_makes_a_different_kek(cfg: Pkcs11KekConfig, tmp_path: Path) -> None:
    create_wrapping_key(cfg)
    provision_wrapped_kek(cfg)
    other = replace(cfg, wrapped_kek_file=tmp_path / "second.wrapped")
    provision_wrapped_kek(other)
    assert load_kek_pkcs11(cfg) != load_kek_pkcs11(other)


def test_wrapped_file_is_not_the_kek_and_mode_0600(provisioned: tuple[Pkcs11KekConfig, bytes]) -> None:
    cfg, kek = provisioned
    path = cfg.wrapped_kek_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert kek not in raw
    assert kek.hex().encode() not in raw
    assert base64.b64encode(kek) not in raw
    doc = json.loads(raw)
    assert doc["format"] == "qkms-pkcs11-wrapped-kek"
    assert doc["mechanism"] == "CKM_AES_KEY_WRAP_PAD"
    assert doc["key_label"] == cfg.key_label
    wrapped = base64.b64decode(doc["wrapped_kek"])
    assert len(wrapped) == KEK_BYTES + 8  # RFC 5649: one 64-bit integrity block
    assert wrapped != kek


def test_file_mode_ignores_a_permissive_umask(cfg: Pkcs11KekConfig) -> None:
    create_wrapping_key(cfg)
    old = os.umask(0)
    try:
        provision_wrapped_kek(cfg)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cfg.wrapped_kek_file.stat().st_mode) == 0o600


def test_envelope_from_the_pkcs11_kek_seals_and_opens(provisioned: tuple[Pkcs11KekConfig, bytes]) -> None:
    cfg, kek = provisioned
    sealed = Envelope(kek, "kek-pkcs11").seal(b"qkd key material", b"key-id|active")
    # A restart: a new Envelope from a fresh unwrap opens what the old one sealed.
    reopened = Envelope(load_kek_pkcs11(cfg), "kek-pkcs11")
    assert reopened.open(sealed, b"key-id|active") == b"qkd key material"
    with pytest.raises(MaterialIntegrityError):
        reopened.open(sealed, b"key-id|consumed")


def test_create_wrapping_key_is_idempotent(cfg: Pkcs11KekConfig, token: SoftHsmToken) -> None:
    create_wrapping_key(cfg)
    provision_wrapped_kek(cfg)
    kek = load_kek_pkcs11(cfg)
    create_wrapping_key(cfg)  # the key is there: nothing changes
    assert load_kek_pkcs11(cfg) == kek
    lib = pkcs11.lib(str(token.module))
    with lib.get_token(token_label=token.label).open(user_pin=token.pin) as session:
        keys = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: cfg.key_label})
        )
    assert len(keys) == 1


def test_provision_refuses_to_overwrite(provisioned: tuple[Pkcs11KekConfig, bytes]) -> None:
    cfg, kek = provisioned
    before = cfg.wrapped_kek_file.read_bytes()
    with pytest.raises(KekError, match="already exists"):
        provision_wrapped_kek(cfg)
    assert cfg.wrapped_kek_file.read_bytes() == before
    assert load_kek_pkcs11(cfg) == kek


# --------------------------------------------------------------------------- the wrapping key


def test_wrapping_key_is_not_extractable(cfg: Pkcs11KekConfig, token: SoftHsmToken) -> None:
    create_wrapping_key(cfg)
    lib = pkcs11.lib(str(token.module))
    with lib.get_token(token_label=token.label).open(user_pin=token.pin, rw=True) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=cfg.key_label)
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.VALUE_LEN] == 32
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
        # Nor can it be exported wrapped under another key.
        exporter = session.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.TOKEN: False, Attribute.WRAP: True}
        )
        assert isinstance(exporter, WrapMixin)
        with pytest.raises(p11e.KeyUnextractable):
            exporter.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        # And it cannot be made extractable afterwards.
        with pytest.raises(p11e.PKCS11Error):
            key[Attribute.EXTRACTABLE] = True


def test_create_refuses_an_extractable_key_under_the_label(cfg: Pkcs11KekConfig, token: SoftHsmToken) -> None:
    lib = pkcs11.lib(str(token.module))
    with lib.get_token(token_label=token.label).open(user_pin=token.pin, rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=cfg.key_label,
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    with pytest.raises(KekError, match="extractable") as info:
        create_wrapping_key(cfg)
    with pytest.raises(KekError, match="extractable"):
        provision_wrapped_kek(cfg)
    assert not cfg.wrapped_kek_file.exists()
    _secrets_absent(info.value, token.pin)


# --------------------------------------------------------------------------- failures


def test_wrong_pin(
    provisioned: tuple[Pkcs11KekConfig, bytes], token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, kek = provisioned
    wrong = "not-" + token.pin
    monkeypatch.setenv(PIN_ENV, wrong)
    with pytest.raises(KekError, match="wrong user PIN") as info:
        load_kek_pkcs11(cfg)
    assert PIN_ENV in str(info.value)
    _secrets_absent(info.value, wrong, token.pin, kek)


def test_missing_pin_env_var(
    provisioned: tuple[Pkcs11KekConfig, bytes], token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, kek = provisioned
    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(KekError, match=f"environment variable {PIN_ENV} .* not set") as info:
        load_kek_pkcs11(cfg)
    _secrets_absent(info.value, token.pin, kek)
    monkeypatch.setenv(PIN_ENV, "")
    with pytest.raises(KekError, match="not set"):
        load_kek_pkcs11(cfg)
    with pytest.raises(KekError, match="not set"):
        create_wrapping_key(cfg)


def test_default_pin_env_is_qkms_pkcs11_pin() -> None:
    cfg = Pkcs11KekConfig(Path("/lib/p11.so"), "token", "key", Path("kek.wrapped"))
    assert cfg.pin_env == "QKMS_PKCS11_PIN"


def test_missing_key_label(
    provisioned: tuple[Pkcs11KekConfig, bytes], token: SoftHsmToken, tmp_path: Path
) -> None:
    cfg, kek = provisioned
    # A file that names the missing label, so the key lookup (not the label check) is what fails.
    other = replace(cfg, key_label="no-such-key", wrapped_kek_file=tmp_path / "other.wrapped")
    doc = json.loads(cfg.wrapped_kek_file.read_text())
    doc["key_label"] = "no-such-key"
    other.wrapped_kek_file.write_text(json.dumps(doc))
    with pytest.raises(KekError, match="no AES wrapping key labelled 'no-such-key'") as info:
        load_kek_pkcs11(other)
    _secrets_absent(info.value, token.pin, kek)
    with pytest.raises(KekError, match="no AES wrapping key labelled 'no-such-key'"):
        provision_wrapped_kek(replace(other, wrapped_kek_file=tmp_path / "third.wrapped"))
    assert not (tmp_path / "third.wrapped").exists()


def test_file_names_another_key(provisioned: tuple[Pkcs11KekConfig, bytes]) -> None:
    cfg, _ = provisioned
    with pytest.raises(
        KekError, match=r"was wrapped with key .* but the configuration names key 'elsewhere'"
    ):
        load_kek_pkcs11(replace(cfg, key_label="elsewhere"))


def test_unknown_token(provisioned: tuple[Pkcs11KekConfig, bytes], token: SoftHsmToken) -> None:
    cfg, kek = provisioned
    with pytest.raises(KekError, match="no PKCS#11 token labelled 'no-such-token'") as info:
        load_kek_pkcs11(replace(cfg, token_label="no-such-token"))
    _secrets_absent(info.value, token.pin, kek)


def test_missing_module(provisioned: tuple[Pkcs11KekConfig, bytes], tmp_path: Path) -> None:
    cfg, _ = provisioned
    with pytest.raises(KekError, match="PKCS#11 module not found"):
        load_kek_pkcs11(replace(cfg, module=tmp_path / "libnothing.so"))


def test_module_that_is_not_a_library(provisioned: tuple[Pkcs11KekConfig, bytes], tmp_path: Path) -> None:
    cfg, _ = provisioned
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(KekError, match="cannot load PKCS#11 module"):
        load_kek_pkcs11(replace(cfg, module=fake))


def test_missing_wrapped_file(cfg: Pkcs11KekConfig) -> None:
    create_wrapping_key(cfg)
    with pytest.raises(KekError, match="wrapped KEK file not found"):
        load_kek_pkcs11(cfg)


@pytest.mark.parametrize("position", [0, 7, 8, 20, 39])
def test_tampered_wrapped_kek(
    provisioned: tuple[Pkcs11KekConfig, bytes], token: SoftHsmToken, position: int
) -> None:
    cfg, kek = provisioned
    doc = json.loads(cfg.wrapped_kek_file.read_text())
    wrapped = bytearray(base64.b64decode(doc["wrapped_kek"]))
    wrapped[position] ^= 0x01
    doc["wrapped_kek"] = base64.b64encode(bytes(wrapped)).decode()
    cfg.wrapped_kek_file.write_text(json.dumps(doc))
    with pytest.raises(KekError, match="tampered or was wrapped by a different key") as info:
        load_kek_pkcs11(cfg)
    _secrets_absent(info.value, token.pin, kek)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\xff\xfe", b"{}", b'{"format": "qkms-pkcs11-wrapped-kek"}', b"[1, 2]"],
)
def test_damaged_wrapped_file(provisioned: tuple[Pkcs11KekConfig, bytes], content: bytes) -> None:
    cfg, _ = provisioned
    cfg.wrapped_kek_file.write_bytes(content)
    with pytest.raises(KekError, match=r"not a valid QKMS wrapped KEK file|unsupported wrapped KEK"):
        load_kek_pkcs11(cfg)


def test_truncated_or_bad_base64(provisioned: tuple[Pkcs11KekConfig, bytes]) -> None:
    cfg, _ = provisioned
    doc = json.loads(cfg.wrapped_kek_file.read_text())
    wrapped = base64.b64decode(doc["wrapped_kek"])
    doc["wrapped_kek"] = base64.b64encode(wrapped[:-8]).decode()
    cfg.wrapped_kek_file.write_text(json.dumps(doc))
    with pytest.raises(KekError, match="tampered or was wrapped by a different key"):
        load_kek_pkcs11(cfg)
    doc["wrapped_kek"] = "!!not base64!!"
    cfg.wrapped_kek_file.write_text(json.dumps(doc))
    with pytest.raises(KekError, match="not a valid QKMS wrapped KEK file"):
        load_kek_pkcs11(cfg)


def test_same_label_on_another_token_cannot_unwrap(
    provisioned: tuple[Pkcs11KekConfig, bytes],
    hsm: SoftHsm,
    token: SoftHsmToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second token (same SoftHSM directory) with its own key under the same label: the file is useless there."""
    cfg, kek = provisioned
    second = hsm.init_token(f"other-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv(PIN_ENV, second.pin)
    elsewhere = replace(cfg, token_label=second.label)
    create_wrapping_key(elsewhere)
    with pytest.raises(KekError, match="tampered or was wrapped by a different key") as info:
        load_kek_pkcs11(elsewhere)
    _secrets_absent(info.value, second.pin, kek)
    # The first token still works after the library was re-initialised for the new token.
    monkeypatch.setenv(PIN_ENV, token.pin)
    assert load_kek_pkcs11(cfg) == kek
