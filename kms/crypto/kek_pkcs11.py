"""The key-encryption key from a PKCS#11 token (docs/DECISIONS.md D-7).

The token holds a non-extractable AES-256 *wrapping key*. The KEK itself is generated once, inside the
token, wrapped by that key with ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649, which authenticates the wrapped
key) and stored in a small JSON file next to the configuration. At start the KME logs in, asks the
token to unwrap the file into a short-lived session object, reads the 32 bytes and destroys the
object: the hot path never calls the HSM, and a stolen disk without the token yields nothing.

The user PIN comes only from an environment variable (``Pkcs11KekConfig.pin_env``), never from a file.
Every failure is a :class:`~kms.crypto.envelope.KekError` whose message names what went wrong and
never contains the PIN or key bytes.

Operational sequence::

    create_wrapping_key(cfg)        # once per token; idempotent
    provision_wrapped_kek(cfg)      # once; refuses to overwrite the file
    kek = load_kek_pkcs11(cfg)      # at every start

The PKCS#11 module is loaded in-process through python-pkcs11, which keeps one loaded, initialised
library per path for the life of the process; this module never finalises it (other code in the
process may hold sessions on it).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.types import Key, SecretKey, Session, UnwrapMixin, WrapMixin

from kms.crypto.envelope import KEK_BYTES, KekError

__all__ = [
    "WRAPPED_KEK_FORMAT",
    "Pkcs11KekConfig",
    "create_wrapping_key",
    "load_kek_pkcs11",
    "provision_wrapped_kek",
]

WRAPPED_KEK_FORMAT = "qkms-pkcs11-wrapped-kek"
_FORMAT_VERSION = 1
_MECHANISM_NAME = "CKM_AES_KEY_WRAP_PAD"
_WRAPPING_KEY_BITS = 256
_MAX_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Pkcs11KekConfig:
    """Where the wrapping key lives and where the wrapped KEK is stored.

    ``module`` is the PKCS#11 shared library (e.g. ``/usr/lib/softhsm/libsofthsm2.so``);
    ``pin_env`` names the environment variable holding the token's user PIN.
    """

    module: Path
    token_label: str
    key_label: str
    wrapped_kek_file: Path
    pin_env: str = "QKMS_PKCS11_PIN"


# --------------------------------------------------------------------------- token access


def _pin(cfg: Pkcs11KekConfig) -> str:
    pin = os.environ.get(cfg.pin_env)
    if not pin:
        raise KekError(
            f"environment variable {cfg.pin_env} holding the PKCS#11 user PIN for token "
            f"{cfg.token_label!r} is not set"
        )
    return pin


@contextlib.contextmanager
def _session(cfg: Pkcs11KekConfig, *, rw: bool) -> Iterator[Session]:
    """Load the module, find the token, log in as the user; KekError with a clear reason otherwise."""
    pin = _pin(cfg)  # checked first: no point loading a module we cannot log in to
    if not cfg.module.is_file():
        raise KekError(f"PKCS#11 module not found: {cfg.module}")
    try:
        lib = pkcs11.lib(str(cfg.module))
    except p11e.PKCS11Error as exc:
        # python-pkcs11 reports dlopen() failures with the loader's message; it holds no secrets.
        raise KekError(f"cannot load PKCS#11 module {cfg.module}: {exc}") from exc

    try:
        token = lib.get_token(token_label=cfg.token_label)
    except p11e.NoSuchToken as exc:
        raise KekError(f"no PKCS#11 token labelled {cfg.token_label!r} in module {cfg.module}") from exc
    except p11e.MultipleTokensReturned as exc:
        raise KekError(
            f"several PKCS#11 tokens are labelled {cfg.token_label!r} in module {cfg.module}"
        ) from exc
    except p11e.PKCS11Error as exc:
        raise KekError(f"cannot list the tokens of PKCS#11 module {cfg.module}: {_rv(exc)}") from exc

    try:
        session = token.open(rw=rw, user_pin=pin)
    except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as exc:
        raise KekError(
            f"login to PKCS#11 token {cfg.token_label!r} failed: wrong user PIN (from {cfg.pin_env})"
        ) from exc
    except (p11e.PinLocked, p11e.PinExpired) as exc:
        raise KekError(
            f"login to PKCS#11 token {cfg.token_label!r} failed: the user PIN is locked or expired"
        ) from exc
    except p11e.UserAlreadyLoggedIn as exc:
        raise KekError(
            f"another session in this process is already logged in to PKCS#11 token {cfg.token_label!r}"
        ) from exc
    except p11e.UserPinNotInitialized as exc:
        raise KekError(f"PKCS#11 token {cfg.token_label!r} has no user PIN initialised") from exc
    except p11e.PKCS11Error as exc:
        raise KekError(f"cannot open a session on PKCS#11 token {cfg.token_label!r}: {_rv(exc)}") from exc
    try:
        yield session
    finally:
        with contextlib.suppress(Exception):
            session.close()


def _rv(exc: BaseException) -> str:
    """A PKCS#11 error as its class name (the CKR_ code), never with arguments that could carry data."""
    return type(exc).__name__


def _find_wrapping_key(session: Session, cfg: Pkcs11KekConfig) -> Key | None:
    """The AES secret key labelled ``cfg.key_label``, or None; KekError if the label is ambiguous."""

    try:
        return session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=cfg.key_label)
    except p11e.NoSuchKey:
        return None
    except p11e.MultipleObjectsReturned as exc:
        raise KekError(
            f"several AES keys are labelled {cfg.key_label!r} on PKCS#11 token {cfg.token_label!r}"
        ) from exc
    except p11e.PKCS11Error as exc:
        raise KekError(f"cannot search PKCS#11 token {cfg.token_label!r} for keys: {_rv(exc)}") from exc


def _check_wrapping_key(key: Key, cfg: Pkcs11KekConfig) -> None:
    """Refuse a key that could leave the token or cannot wrap and unwrap."""

    try:
        extractable = bool(key[Attribute.EXTRACTABLE])
        sensitive = bool(key[Attribute.SENSITIVE])
        can_wrap = bool(key[Attribute.WRAP])
        can_unwrap = bool(key[Attribute.UNWRAP])
        bits = int(key[Attribute.VALUE_LEN]) * 8
    except p11e.PKCS11Error as exc:
        raise KekError(f"cannot read the attributes of key {cfg.key_label!r}: {_rv(exc)}") from exc
    where = f"key {cfg.key_label!r} on PKCS#11 token {cfg.token_label!r}"
    if extractable or not sensitive:
        raise KekError(f"{where} is extractable or not sensitive; it must never leave the token")
    if not (can_wrap and can_unwrap):
        raise KekError(f"{where} is not allowed to wrap and unwrap keys")
    if bits != _WRAPPING_KEY_BITS:
        raise KekError(f"{where} is AES-{bits}; AES-{_WRAPPING_KEY_BITS} is required")


def _require_wrapping_key(session: Session, cfg: Pkcs11KekConfig) -> Key:
    key = _find_wrapping_key(session, cfg)
    if key is None:
        raise KekError(
            f"no AES wrapping key labelled {cfg.key_label!r} on PKCS#11 token {cfg.token_label!r} "
            "(create it with create_wrapping_key)"
        )
    _check_wrapping_key(key, cfg)
    return key


# --------------------------------------------------------------------------- wrapped-KEK file


def _encode_file(cfg: Pkcs11KekConfig, wrapped: bytes) -> bytes:
    doc = {
        "format": WRAPPED_KEK_FORMAT,
        "version": _FORMAT_VERSION,
        "mechanism": _MECHANISM_NAME,
        "token_label": cfg.token_label,
        "key_label": cfg.key_label,
        "wrapped_kek": base64.b64encode(wrapped).decode("ascii"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _read_wrapped(cfg: Pkcs11KekConfig) -> bytes:
    """The wrapped KEK bytes from the file, after checking its format and which key wrapped it."""
    path = cfg.wrapped_kek_file
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise KekError(f"wrapped KEK file not found: {path} (create it with provision_wrapped_kek)") from exc
    except OSError as exc:
        raise KekError(f"cannot read wrapped KEK file {path}: {exc.strerror}") from exc
    bad = f"{path} is not a valid QKMS wrapped KEK file (damaged or tampered)"
    if len(raw) > _MAX_FILE_BYTES:
        raise KekError(bad)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KekError(bad) from exc
    if not isinstance(doc, dict) or doc.get("format") != WRAPPED_KEK_FORMAT:
        raise KekError(bad)
    if doc.get("version") != _FORMAT_VERSION or doc.get("mechanism") != _MECHANISM_NAME:
        raise KekError(
            f"{path}: unsupported wrapped KEK version/mechanism "
            f"{doc.get('version')!r}/{doc.get('mechanism')!r}"
        )
    if doc.get("key_label") != cfg.key_label:
        raise KekError(
            f"{path} was wrapped with key {doc.get('key_label')!r}, but the configuration names "
            f"key {cfg.key_label!r}"
        )
    encoded = doc.get("wrapped_kek")
    if not isinstance(encoded, str):
        raise KekError(bad)
    try:
        wrapped = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KekError(bad) from exc
    if not wrapped:
        raise KekError(bad)
    return wrapped


# --------------------------------------------------------------------------- public API


def create_wrapping_key(cfg: Pkcs11KekConfig) -> None:
    """Generate the non-extractable AES-256 wrapping key on the token unless it is already there.

    Idempotent; an existing key with the label is checked (non-extractable, sensitive, wrap/unwrap,
    AES-256) and a KekError raised if it does not qualify.
    """

    with _session(cfg, rw=True) as session:
        existing = _find_wrapping_key(session, cfg)
        if existing is not None:
            _check_wrapping_key(existing, cfg)
            return
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        }
        try:
            session.generate_key(
                KeyType.AES, _WRAPPING_KEY_BITS, label=cfg.key_label, store=True, template=template
            )
        except p11e.PKCS11Error as exc:
            raise KekError(
                f"cannot generate wrapping key {cfg.key_label!r} on PKCS#11 token {cfg.token_label!r}: "
                f"{_rv(exc)}"
            ) from exc


def provision_wrapped_kek(cfg: Pkcs11KekConfig) -> None:
    """Generate a fresh KEK inside the token, wrap it, and write the wrapped form (mode 0600).

    The KEK is generated by the token as a sensitive session object and leaves it only wrapped, so it
    never passes through this process here. Refuses to overwrite an existing file.
    """

    path = cfg.wrapped_kek_file
    if path.exists() or path.is_symlink():
        raise KekError(f"wrapped KEK file {path} already exists; refusing to overwrite it")
    with _session(cfg, rw=True) as session:
        wrapping_key = _require_wrapping_key(session, cfg)
        if not isinstance(wrapping_key, WrapMixin):
            raise KekError(f"key {cfg.key_label!r} does not support wrapping")
        try:
            kek = session.generate_key(
                KeyType.AES,
                KEK_BYTES * 8,
                store=False,
                template={
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True,
                },
            )
        except p11e.PKCS11Error as exc:
            raise KekError(f"PKCS#11 token {cfg.token_label!r} cannot generate a KEK: {_rv(exc)}") from exc
        try:
            wrapped = _wrap(wrapping_key, kek)
        except p11e.PKCS11Error as exc:
            raise KekError(
                f"PKCS#11 token {cfg.token_label!r} cannot wrap the KEK with key {cfg.key_label!r} "
                f"({_MECHANISM_NAME}): {_rv(exc)}"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                kek.destroy()

    data = _encode_file(cfg, wrapped)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KekError(f"wrapped KEK file {path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise KekError(f"cannot create wrapped KEK file {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise KekError(f"cannot write wrapped KEK file {path}: {exc.strerror}") from exc


def load_kek_pkcs11(cfg: Pkcs11KekConfig) -> bytes:
    """Unwrap the KEK file with the token's wrapping key and return the 32-byte KEK."""

    wrapped = _read_wrapped(cfg)  # before touching the token: a bad file is reported as such
    with _session(cfg, rw=False) as session:
        wrapping_key = _require_wrapping_key(session, cfg)
        if not isinstance(wrapping_key, UnwrapMixin):
            raise KekError(f"key {cfg.key_label!r} does not support unwrapping")
        try:
            unwrapped = _unwrap(wrapping_key, wrapped)
        except (
            p11e.GeneralError,
            p11e.WrappedKeyInvalid,
            p11e.WrappedKeyLenRange,
            p11e.FunctionFailed,
        ) as exc:
            raise KekError(
                f"key {cfg.key_label!r} on PKCS#11 token {cfg.token_label!r} cannot unwrap "
                f"{cfg.wrapped_kek_file}: the file is tampered or was wrapped by a different key"
            ) from exc
        except p11e.PKCS11Error as exc:
            raise KekError(
                f"PKCS#11 token {cfg.token_label!r} refused to unwrap {cfg.wrapped_kek_file}: {_rv(exc)}"
            ) from exc
        try:
            value = unwrapped[Attribute.VALUE]
        except p11e.PKCS11Error as exc:
            raise KekError(
                f"PKCS#11 token {cfg.token_label!r} does not release the unwrapped KEK: {_rv(exc)}"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                unwrapped.destroy()
    if not isinstance(value, bytes) or len(value) != KEK_BYTES:
        raise KekError(f"the KEK unwrapped from {cfg.wrapped_kek_file} is not {KEK_BYTES} bytes")
    return value


# --------------------------------------------------------------------------- mechanism calls


def _wrap(wrapping_key: WrapMixin, kek: SecretKey) -> bytes:

    return wrapping_key.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def _unwrap(wrapping_key: UnwrapMixin, wrapped: bytes) -> Key:
    """Unwrap into a session object that may be read once (not sensitive), never stored on the token."""

    return wrapping_key.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        wrapped,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        template={
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
        },
    )
