"""Optional PQC backend: liboqs through liboqs-python (the ``oqs`` module), docs/DECISIONS.md D-6.

Importing ``oqs`` when no liboqs shared library can be loaded makes liboqs-python clone and build
liboqs (``git clone`` + ``cmake`` into ``~/_oqs``) and, if that fails, ``raise SystemExit`` — neither is
acceptable inside a key manager. So :func:`find_liboqs` first repeats liboqs-python's own search
(``oqs/oqs.py: _load_liboqs`` / ``_load_shared_obj``: ``ctypes.util.find_library("oqs")`` and
``("liboqs")``, then ``$OQS_INSTALL_PATH/{lib,lib64}`` — or ``~/_oqs/{lib,lib64}`` when that variable
is unset — for ``liboqs.so`` / ``liboqs.dylib`` / ``oqs.dll``), loads the candidate with ctypes to
prove liboqs-python would succeed, and only then is ``oqs`` imported, with ``SystemExit`` guarded too.

Seeded key generation:

* ML-KEM: ``KeyEncapsulation.generate_keypair_seed`` (liboqs ``OQS_KEM_keypair_derand``) takes the
  FIPS 203 seed ``d || z`` directly.
* ML-DSA: liboqs has no derandomised ``OQS_SIG`` key generation, but its ML-DSA key generation
  (mldsa-native ``crypto_sign_keypair``) draws exactly one 32-byte ``xi`` from ``OQS_randombytes`` and
  then runs FIPS 204 ``ML-DSA.KeyGen_internal(xi)``. We install a one-shot ``OQS_randombytes``
  callback that supplies ``xi``, check that liboqs drew exactly that one 32-byte block, and restore
  the system RNG. The interop self-test then proves the result equals the default backend's key.
  Because the RNG hook is process-wide, every liboqs call made here holds one lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import io
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kms.crypto.pqc.base import (
    KEM_SIZES,
    ML_DSA_MAX_CONTEXT_BYTES,
    SIGNATURE_SIZES,
    BackendUnavailableError,
    InvalidCiphertextError,
    InvalidKeyError,
    KemAlgorithm,
    KemKeyPair,
    PqcError,
    SignatureAlgorithm,
    SignatureKeyPair,
    check_length,
    kem_algorithm,
    signature_algorithm,
)

BACKEND_NAME: Final = "liboqs"

# Symbols this backend relies on; a library lacking any of them is too old to use.
_REQUIRED_SYMBOLS: Final = (
    "OQS_version",
    "OQS_SIG_sign_with_ctx_str",
    "OQS_SIG_verify_with_ctx_str",
    "OQS_randombytes_custom_algorithm",
    "OQS_randombytes_switch_algorithm",
)

_LOCK = threading.RLock()
_RANDOMBYTES_CB = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)


@dataclass(frozen=True, slots=True)
class LiboqsLocation:
    """Where a loadable liboqs shared library was found, and which rule found it."""

    path: str
    found_by: str
    version: str


def _install_dir() -> Path:
    """liboqs-python's install folder: ``$OQS_INSTALL_PATH`` if set (even empty), else ``~/_oqs``."""
    env = os.environ.get("OQS_INSTALL_PATH")
    if env is not None:
        return Path(env)
    try:
        return Path.home() / "_oqs"
    except RuntimeError:  # no home directory at all
        return Path("_oqs")


def _candidates() -> Iterator[tuple[str, str]]:
    """Candidate library paths in liboqs-python's order of preference, each with its rule."""
    for name in ("liboqs", "oqs"):  # liboqs-python inserts each find_library hit at the front
        try:
            hit = ctypes.util.find_library(name)
        except Exception:  # find_library shells out; any failure simply means "not found"
            hit = None
        if hit:
            yield hit, f'ctypes.util.find_library("{name}")'
    install = _install_dir()
    system = platform.system()
    if system == "Windows":
        dirs = [install / "bin"]
        names = ["oqs.dll", "liboqs.dll"]
    else:
        dirs = [install / "lib", install / "lib64"]
        names = ["liboqs.dylib"] if system == "Darwin" else ["liboqs.so"]
    rule = "OQS_INSTALL_PATH" if "OQS_INSTALL_PATH" in os.environ else "~/_oqs"
    for directory in dirs:
        for name in names:
            path = directory.absolute() / name
            if path.is_file():
                yield str(path), f"{rule} ({directory.name}/)"


def find_liboqs() -> tuple[LiboqsLocation | None, str]:
    """Locate a loadable liboqs *without importing oqs*; returns ``(location, reason if none)``."""
    tried: list[str] = []
    for path, rule in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path}: cannot load ({exc})")
            continue
        missing = [sym for sym in _REQUIRED_SYMBOLS if not hasattr(lib, sym)]
        if missing:
            tried.append(f"{path}: too old, lacks {', '.join(missing)}")
            continue
        lib.OQS_version.restype = ctypes.c_char_p
        raw = lib.OQS_version()
        version = raw.decode("ascii", "replace") if isinstance(raw, bytes) else "unknown"
        return LiboqsLocation(path=path, found_by=rule, version=version), ""
    where = f"{_install_dir()}/lib, lib64 and the system library path"
    if tried:
        return None, "no usable liboqs shared library: " + "; ".join(tried)
    return None, f"liboqs shared library not found ({where})"


def _import_oqs() -> Any:
    """Import ``oqs`` (only ever after :func:`find_liboqs` succeeded), containing its side effects.

    liboqs-python prints to stdout at import and may warn about version skew; both are captured so a
    ``--json`` report stays clean. Its stdout log handler is dropped so later messages go through
    ordinary logging.
    """
    already = sys.modules.get("oqs")
    if already is not None:
        return already
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module("oqs")
    except SystemExit as exc:  # liboqs-python's "could not load/install liboqs" path
        raise BackendUnavailableError(f"importing oqs exited the interpreter (code {exc.code!r})") from None
    except ImportError as exc:
        raise BackendUnavailableError(f"liboqs-python is not installed ({exc.name or exc})") from None
    except Exception as exc:
        raise BackendUnavailableError(f"importing oqs failed: {type(exc).__name__}: {exc}") from None
    oqs_logger = logging.getLogger("oqs.oqs")
    for handler in list(oqs_logger.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is captured:
            oqs_logger.removeHandler(handler)
    return module


@contextlib.contextmanager
def _seeded_randombytes(native: Any, seed: bytes) -> Iterator[list[int]]:
    """Feed ``seed`` to the next ``OQS_randombytes`` call of exactly its length; yields the draw sizes.

    Any other draw gets fresh OS randomness (so nothing is ever predictable) and shows up in the
    returned list, which callers check to refuse a derivation that did not use the seed exactly once.
    """
    draws: list[int] = []
    pending = [seed]

    def feed(buffer: Any, length: int) -> None:
        draws.append(length)
        data = pending.pop() if pending and len(pending[0]) == length else os.urandom(length)
        ctypes.memmove(buffer, data, length)

    callback = _RANDOMBYTES_CB(feed)
    native.OQS_randombytes_custom_algorithm(callback)
    try:
        yield draws
    finally:
        native.OQS_randombytes_switch_algorithm(b"system")
        del callback


class _LiboqsBase:
    name: str = BACKEND_NAME

    def __init__(self, oqs: Any, location: LiboqsLocation) -> None:
        self._oqs = oqs
        self.location = location
        self.version: str = f"liboqs {oqs.oqs_version()} (liboqs-python {oqs.oqs_python_version()})"


class LiboqsKemProvider(_LiboqsBase):
    """ML-KEM-768/1024 on liboqs."""

    def _keypair(self, kem: Any, alg: KemAlgorithm, seed: bytes) -> bytes:
        """Derive into ``kem`` (which then holds the expanded secret key) and return the public key."""
        check_length(f"{alg} seed", seed, KEM_SIZES[alg].seed, InvalidKeyError)
        if hasattr(kem, "generate_keypair_seed"):
            try:
                return bytes(kem.generate_keypair_seed(bytes(seed)))
            except (RuntimeError, ValueError):
                raise InvalidKeyError(f"{alg} seed rejected by liboqs") from None
        # Older liboqs-python: ML-KEM key generation draws d || z as one 64-byte block.
        with _seeded_randombytes(self._oqs.native(), bytes(seed)) as draws:
            public_key = bytes(kem.generate_keypair())
        if draws != [len(seed)]:
            raise PqcError(f"liboqs {alg} key generation did not draw a single {len(seed)}-byte seed")
        return public_key

    def generate(self, alg: KemAlgorithm, seed: bytes | None = None) -> KemKeyPair:
        alg = kem_algorithm(alg)
        seed = os.urandom(KEM_SIZES[alg].seed) if seed is None else bytes(seed)
        return KemKeyPair(alg, self.public_key_from_seed(alg, seed), seed)

    def public_key_from_seed(self, alg: KemAlgorithm, private_seed: bytes) -> bytes:
        alg = kem_algorithm(alg)
        with _LOCK, self._oqs.KeyEncapsulation(str(alg)) as kem:
            return self._keypair(kem, alg, private_seed)

    def encapsulate(self, alg: KemAlgorithm, public_key: bytes) -> tuple[bytes, bytes]:
        alg = kem_algorithm(alg)
        check_length(f"{alg} public key", public_key, KEM_SIZES[alg].public_key, InvalidKeyError)
        with _LOCK, self._oqs.KeyEncapsulation(str(alg)) as kem:
            try:
                ciphertext, shared_secret = kem.encap_secret(bytes(public_key))
            except RuntimeError:
                raise InvalidKeyError(
                    f"{alg} public key fails the FIPS 203 encapsulation key check"
                ) from None
        return bytes(ciphertext), bytes(shared_secret)

    def decapsulator(self, alg: KemAlgorithm, private_seed: bytes) -> Callable[[bytes], bytes]:
        """liboqs has no key object to keep: each call decapsulates from the seed."""
        seed = bytes(private_seed)
        return lambda ciphertext: self.decapsulate(alg, seed, ciphertext)

    def decapsulate(self, alg: KemAlgorithm, private_seed: bytes, ciphertext: bytes) -> bytes:
        alg = kem_algorithm(alg)
        check_length(f"{alg} ciphertext", ciphertext, KEM_SIZES[alg].ciphertext, InvalidCiphertextError)
        with _LOCK, self._oqs.KeyEncapsulation(str(alg)) as kem:
            self._keypair(kem, alg, private_seed)
            try:
                return bytes(kem.decap_secret(bytes(ciphertext)))
            except RuntimeError:
                raise InvalidCiphertextError(f"{alg} decapsulation failed in liboqs") from None


class LiboqsSignatureProvider(_LiboqsBase):
    """ML-DSA-44/65/87 on liboqs (pure ML-DSA with context strings, hedged signing)."""

    def _keypair(self, sig: Any, alg: SignatureAlgorithm, seed: bytes) -> bytes:
        check_length(f"{alg} seed", seed, SIGNATURE_SIZES[alg].seed, InvalidKeyError)
        with _seeded_randombytes(self._oqs.native(), bytes(seed)) as draws:
            public_key = bytes(sig.generate_keypair())
        if draws != [len(seed)]:
            # Refuse a key that may not be KeyGen_internal(xi); the stray material is never used.
            raise PqcError(
                f"liboqs {alg} key generation drew {len(draws)} random blocks, not one {len(seed)}-byte xi"
            )
        return public_key

    def generate(self, alg: SignatureAlgorithm, seed: bytes | None = None) -> SignatureKeyPair:
        alg = signature_algorithm(alg)
        seed = os.urandom(SIGNATURE_SIZES[alg].seed) if seed is None else bytes(seed)
        return SignatureKeyPair(alg, self.public_key_from_seed(alg, seed), seed)

    def public_key_from_seed(self, alg: SignatureAlgorithm, private_seed: bytes) -> bytes:
        alg = signature_algorithm(alg)
        with _LOCK, self._oqs.Signature(str(alg)) as sig:
            return self._keypair(sig, alg, private_seed)

    def sign(
        self, alg: SignatureAlgorithm, private_seed: bytes, message: bytes, context: bytes = b""
    ) -> bytes:
        alg = signature_algorithm(alg)
        if len(context) > ML_DSA_MAX_CONTEXT_BYTES:
            raise PqcError(f"ML-DSA context must be at most {ML_DSA_MAX_CONTEXT_BYTES} bytes")
        with _LOCK, self._oqs.Signature(str(alg)) as sig:
            self._keypair(sig, alg, private_seed)
            try:
                return bytes(sig.sign_with_ctx_str(bytes(message), bytes(context)))
            except RuntimeError:
                raise PqcError(f"liboqs {alg} signing failed") from None

    def signer(self, alg: SignatureAlgorithm, private_seed: bytes) -> Callable[[bytes, bytes], bytes]:
        """liboqs has no key object to keep: each call signs from the seed."""
        alg = signature_algorithm(alg)
        check_length(f"{alg} seed", private_seed, SIGNATURE_SIZES[alg].seed, InvalidKeyError)
        seed = bytes(private_seed)

        def sign(message: bytes, context: bytes = b"") -> bytes:
            return self.sign(alg, seed, message, context)

        return sign

    def verify(
        self,
        alg: SignatureAlgorithm,
        public_key: bytes,
        message: bytes,
        signature: bytes,
        context: bytes = b"",
    ) -> bool:
        alg = signature_algorithm(alg)
        check_length(f"{alg} public key", public_key, SIGNATURE_SIZES[alg].public_key, InvalidKeyError)
        if len(context) > ML_DSA_MAX_CONTEXT_BYTES or len(signature) != SIGNATURE_SIZES[alg].signature:
            return False
        try:
            with _LOCK, self._oqs.Signature(str(alg)) as sig:
                return bool(
                    sig.verify_with_ctx_str(
                        bytes(message), bytes(signature), bytes(context), bytes(public_key)
                    )
                )
        except (RuntimeError, ValueError):
            return False


def load_liboqs_providers() -> tuple[LiboqsKemProvider, LiboqsSignatureProvider]:
    """Find liboqs, import ``oqs`` safely, and check it offers every algorithm we need.

    Raises :class:`BackendUnavailableError` with the reason; never downloads or builds anything.
    """
    location, reason = find_liboqs()
    if location is None:
        raise BackendUnavailableError(reason)
    oqs = _import_oqs()
    missing_api = [
        f"{cls}.{attr}"
        for cls, attr in (("Signature", "sign_with_ctx_str"), ("Signature", "verify_with_ctx_str"))
        if not hasattr(getattr(oqs, cls, None), attr)
    ]
    if missing_api:
        raise BackendUnavailableError(f"liboqs-python too old: lacks {', '.join(missing_api)}")
    enabled_kems = set(oqs.get_enabled_kem_mechanisms())
    enabled_sigs = set(oqs.get_enabled_sig_mechanisms())
    missing = [str(a) for a in KemAlgorithm if str(a) not in enabled_kems]
    missing += [str(a) for a in SignatureAlgorithm if str(a) not in enabled_sigs]
    if missing:
        raise BackendUnavailableError(f"liboqs at {location.path} lacks {', '.join(missing)}")
    return LiboqsKemProvider(oqs, location), LiboqsSignatureProvider(oqs, location)


__all__ = [
    "BACKEND_NAME",
    "LiboqsKemProvider",
    "LiboqsLocation",
    "LiboqsSignatureProvider",
    "find_liboqs",
    "load_liboqs_providers",
]
