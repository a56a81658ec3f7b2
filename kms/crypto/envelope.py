"""AES-256-GCM envelope encryption of key material at rest (docs/DECISIONS.md D-7).

Every record gets a fresh 96-bit nonce and associated data that binds it to its identity and state,
so a ciphertext copied onto another row, or replayed into an earlier state, fails to decrypt.
Stored form: ``nonce || ciphertext || tag``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
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
    """Seals under one *write* KEK version and opens under any version it holds (a keyring).

    Several versions are held only while a KEK rotation re-seals the store (docs/DECISIONS.md D-27):
    every sealed record names its version in its ``kek_id`` column, so callers that read the column
    pass it to :meth:`open`; the others fall back to trying the write version first, then the rest
    (AES-GCM's tag makes a wrong key fail, never open to wrong bytes). ``attach_sync`` lets the
    service layer learn new versions from the database without a restart; the crypto layer itself
    never reads the database.
    """

    def __init__(self, kek: bytes, kek_id: str) -> None:
        self._keys: dict[str, AESGCM] = {}
        self._mac_keys: dict[str, bytes] = {}
        self._write: tuple[str, AESGCM] = ("", AESGCM(bytes(KEK_BYTES)))
        self._sync: Callable[[Envelope], None] | None = None
        self._sync_every = 0.0
        self._next_sync = 0.0
        self._sync_began = 0.0
        self._sync_lock = threading.Lock()
        self.add_version(kek_id, kek, write=True)

    # -- the keyring ---------------------------------------------------------------------------
    def add_version(self, kek_id: str, kek: bytes, *, write: bool = False) -> None:
        if len(kek) != KEK_BYTES:
            raise KekError(f"the KEK must be {KEK_BYTES} bytes")
        self._keys = {**self._keys, kek_id: AESGCM(kek)}
        self._mac_keys = {**self._mac_keys, kek_id: hmac.new(kek, _MAC_LABEL, hashlib.sha256).digest()}
        if write:
            self.set_write(kek_id)

    def set_write(self, kek_id: str) -> None:
        """Seal everything from now on under ``kek_id`` (a version already held)."""
        self._write = (kek_id, self._keys[kek_id])

    def forget(self, kek_id: str) -> None:
        """Drop a retired version (never the write version)."""
        if kek_id != self._write[0]:
            self._keys = {k: v for k, v in self._keys.items() if k != kek_id}
            self._mac_keys = {k: v for k, v in self._mac_keys.items() if k != kek_id}

    @property
    def kek_id(self) -> str:
        """The write version. Read it through :meth:`writer` when it must match what is sealed."""
        return self._write[0]

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def attach_sync(self, sync: Callable[[Envelope], None], every_seconds: float) -> None:
        """Call ``sync(self)`` at most every ``every_seconds`` before sealing, and at once when a
        record does not open under the versions held (it may be sealed under a newer one)."""
        self._sync, self._sync_every = sync, every_seconds
        self._next_sync = time.monotonic() + every_seconds

    def _maybe_sync(self, failed_at: float | None = None) -> None:
        """Sync if due; with ``failed_at`` (a record did not open then), wait for any sync in
        progress and sync again unless one began after the failure (it saw every version committed
        before it: a rotation records its version before it re-seals anything)."""
        sync = self._sync
        if sync is None:
            return
        if failed_at is None:
            if time.monotonic() < self._next_sync or not self._sync_lock.acquire(blocking=False):
                return
        else:
            self._sync_lock.acquire()
            if self._sync_began > failed_at:
                self._sync_lock.release()
                return
        try:
            self._sync_began = time.monotonic()
            self._next_sync = self._sync_began + self._sync_every
            sync(self)
        finally:
            self._sync_lock.release()

    def mac(self, data: bytes, kek_id: str) -> str:
        """HMAC-SHA256 of ``data`` under a key derived from KEK version ``kek_id`` (hex): what makes
        a backup's manifest tamper-evident to anyone without the KEK (docs/DECISIONS.md D-28)."""
        key = self._mac_keys.get(kek_id)
        if key is None:
            raise KekError(f"KEK version {kek_id} is not loaded")
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    # -- sealing and opening --------------------------------------------------------------------
    def writer(self) -> Sealer:
        """The write version as one consistent pair: seal with it and store its ``kek_id``."""
        self._maybe_sync()
        kek_id, aead = self._write
        return Sealer(kek_id, aead)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self.writer().seal(plaintext, aad)

    def seal_many(self, plaintexts: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        """:meth:`seal` for many records, with their nonces from one read of the OS random source."""
        return self.writer().seal_many(plaintexts, aads)

    def open(self, sealed: bytes, aad: bytes, kek_id: str | None = None) -> bytes:
        """Open ``sealed``; with ``kek_id`` (the record's version) under that version only."""
        try:
            return self._open(sealed, aad, kek_id)
        except _NotHeld:
            self._maybe_sync(failed_at=time.monotonic())
        try:
            return self._open(sealed, aad, kek_id)
        except _NotHeld as exc:
            raise MaterialIntegrityError(
                f"stored key material is sealed under KEK version {kek_id} that this process does not hold"
                if kek_id is not None
                else "stored key material failed authentication"
            ) from exc

    def _open(self, sealed: bytes, aad: bytes, kek_id: str | None) -> bytes:
        nonce, body = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        if kek_id is not None:
            aead = self._keys.get(kek_id)
            if aead is None:
                raise _NotHeld
            try:
                return aead.decrypt(nonce, body, aad)
            except InvalidTag as exc:
                raise MaterialIntegrityError("stored key material failed authentication") from exc
        write_id, write = self._write
        try:
            return write.decrypt(nonce, body, aad)
        except InvalidTag:
            pass
        for other_id, aead in self._keys.items():
            if other_id == write_id:
                continue
            try:
                return aead.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise _NotHeld


class _NotHeld(Exception):
    """No held version opens the record (it may be sealed under one this process has not loaded)."""


_MAC_LABEL = b"qkms/backup-mac-key/v1"


class Sealer:
    """One KEK version's sealing side, taken from :meth:`Envelope.writer`."""

    __slots__ = ("_aead", "kek_id")

    def __init__(self, kek_id: str, aead: AESGCM) -> None:
        self.kek_id = kek_id
        self._aead = aead

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_many(self, plaintexts: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        pool = os.urandom(_NONCE_BYTES * len(plaintexts))
        encrypt = self._aead.encrypt
        out = []
        for i, (plaintext, aad) in enumerate(zip(plaintexts, aads, strict=True)):
            nonce = pool[i * _NONCE_BYTES : (i + 1) * _NONCE_BYTES]
            out.append(nonce + encrypt(nonce, plaintext, aad))
        return out


def kek_check_value(kek: bytes) -> str:
    """A public fingerprint of a KEK (HMAC-SHA256 of a fixed label, 128 bits in hex): tells whether
    a loaded KEK is the version the database recorded, without revealing anything about it."""
    return hmac.new(kek, b"qkms/kek-check-value/v1", hashlib.sha256).hexdigest()[:32]


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
