"""AES-256-GCM envelope encryption of key material at rest (docs/DECISIONS.md D-7).

Every record gets a fresh 96-bit nonce and associated data that binds it to its identity and state,
so a ciphertext copied onto another row, or replayed into an earlier state, fails to decrypt.
Stored form: ``nonce || ciphertext || tag``.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEK_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16


def sealed_length(plaintext_bytes: int) -> int:
    """The stored length of ``plaintext_bytes`` sealed (nonce, ciphertext, tag): what ``qkms db
    check`` expects of every stored key's material."""
    return _NONCE_BYTES + plaintext_bytes + _TAG_BYTES


class KekError(RuntimeError):
    """The key-encryption key cannot be loaded or used; the message never includes key bytes."""


class MaterialIntegrityError(RuntimeError):
    """A stored ciphertext failed authentication: tampered, moved to another row, or wrong KEK."""


class Envelope:
    """Seals and opens key material under one KEK."""

    def __init__(self, kek: bytes, kek_id: str) -> None:
        if len(kek) != KEK_BYTES:
            raise KekError(f"the KEK must be {KEK_BYTES} bytes")
        self._aead = AESGCM(kek)
        self.kek_id = kek_id

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_many(self, plaintexts: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        """:meth:`seal` for many records, with their nonces from one read of the OS random source."""
        pool = os.urandom(_NONCE_BYTES * len(plaintexts))
        encrypt = self._aead.encrypt
        out = []
        for i, (plaintext, aad) in enumerate(zip(plaintexts, aads, strict=True)):
            nonce = pool[i * _NONCE_BYTES : (i + 1) * _NONCE_BYTES]
            out.append(nonce + encrypt(nonce, plaintext, aad))
        return out

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise MaterialIntegrityError("stored key material failed authentication") from exc


def generate_kek_file(path: Path) -> None:
    """Write a fresh random KEK, created with mode 0600 so it is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(KEK_BYTES))


def load_kek_file(path: Path) -> bytes:
    """Read a KEK file, refusing one that group or others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise KekError(f"KEK file not found: {path}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KekError(f"KEK file {path} is accessible by group or others; chmod 600 it")
    data = path.read_bytes()
    if len(data) != KEK_BYTES:
        raise KekError(f"KEK file {path} must hold exactly {KEK_BYTES} bytes")
    return data


def load_kek_env(name: str) -> bytes:
    """Read a base64-encoded KEK from an environment variable."""
    value = os.environ.get(name)
    if not value:
        raise KekError(f"environment variable {name} holding the KEK is not set")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise KekError(f"environment variable {name} is not valid base64") from exc
    if len(data) != KEK_BYTES:
        raise KekError(f"the KEK in {name} must decode to {KEK_BYTES} bytes")
    return data
