"""The one PQC interface every backend implements (docs/DECISIONS.md D-5, D-6).

Private keys are held as their FIPS seeds — ``d || z`` (64 bytes) for ML-KEM (FIPS 203, Algorithm 16)
and ``xi`` (32 bytes) for ML-DSA (FIPS 204, Algorithm 6) — rather than expanded secret keys: a seed is
small enough to seal at rest, re-derives the whole key deterministically, and is the one private-key
format that every implementation (OpenSSL, liboqs) can be checked against.

Nothing in this module ever renders private bytes: key pair reprs hide the seed and every error message
names lengths, never contents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

ML_KEM_SEED_BYTES = 64
ML_DSA_SEED_BYTES = 32
ML_KEM_SHARED_SECRET_BYTES = 32
ML_DSA_MAX_CONTEXT_BYTES = 255


class KemAlgorithm(StrEnum):
    """FIPS 203 parameter sets offered by the service (ML-KEM-512 is deliberately left out)."""

    ML_KEM_768 = "ML-KEM-768"
    ML_KEM_1024 = "ML-KEM-1024"


class SignatureAlgorithm(StrEnum):
    """FIPS 204 parameter sets (pure ML-DSA; no pre-hash variants)."""

    ML_DSA_44 = "ML-DSA-44"
    ML_DSA_65 = "ML-DSA-65"
    ML_DSA_87 = "ML-DSA-87"


@dataclass(frozen=True, slots=True)
class KemSizes:
    """Byte sizes from FIPS 203, Table 3 (plus the 64-byte seed of Algorithm 16)."""

    public_key: int
    ciphertext: int
    expanded_private_key: int
    shared_secret: int = ML_KEM_SHARED_SECRET_BYTES
    seed: int = ML_KEM_SEED_BYTES
    security_category: int = 0


@dataclass(frozen=True, slots=True)
class SignatureSizes:
    """Byte sizes from FIPS 204, Table 2 (plus the 32-byte seed xi of Algorithm 1)."""

    public_key: int
    signature: int
    expanded_private_key: int
    seed: int = ML_DSA_SEED_BYTES
    security_category: int = 0


KEM_SIZES: dict[KemAlgorithm, KemSizes] = {
    KemAlgorithm.ML_KEM_768: KemSizes(
        public_key=1184, ciphertext=1088, expanded_private_key=2400, security_category=3
    ),
    KemAlgorithm.ML_KEM_1024: KemSizes(
        public_key=1568, ciphertext=1568, expanded_private_key=3168, security_category=5
    ),
}

SIGNATURE_SIZES: dict[SignatureAlgorithm, SignatureSizes] = {
    SignatureAlgorithm.ML_DSA_44: SignatureSizes(
        public_key=1312, signature=2420, expanded_private_key=2560, security_category=2
    ),
    SignatureAlgorithm.ML_DSA_65: SignatureSizes(
        public_key=1952, signature=3309, expanded_private_key=4032, security_category=3
    ),
    SignatureAlgorithm.ML_DSA_87: SignatureSizes(
        public_key=2592, signature=4627, expanded_private_key=4896, security_category=5
    ),
}


class PqcError(Exception):
    """Base for PQC failures; messages carry algorithm names and lengths only, never key bytes."""


class UnsupportedAlgorithmError(PqcError):
    """The algorithm name is unknown, or the backend does not offer it."""


class InvalidKeyError(PqcError):
    """A public key or private seed is malformed (wrong length, or fails the FIPS input checks)."""


class InvalidCiphertextError(PqcError):
    """An ML-KEM ciphertext has the wrong length (FIPS 203 §7.3 ciphertext type check)."""


class BackendUnavailableError(PqcError):
    """The named backend is absent, or has not proved itself against the default backend."""


def kem_algorithm(value: str) -> KemAlgorithm:
    """Parse an ML-KEM name (``"ML-KEM-768"``), raising :class:`UnsupportedAlgorithmError`."""
    try:
        return KemAlgorithm(value)
    except ValueError:
        raise UnsupportedAlgorithmError(f"unsupported KEM algorithm {value!r}") from None


def signature_algorithm(value: str) -> SignatureAlgorithm:
    """Parse an ML-DSA name (``"ML-DSA-65"``), raising :class:`UnsupportedAlgorithmError`."""
    try:
        return SignatureAlgorithm(value)
    except ValueError:
        raise UnsupportedAlgorithmError(f"unsupported signature algorithm {value!r}") from None


def kem_sizes(alg: KemAlgorithm | str) -> KemSizes:
    return KEM_SIZES[kem_algorithm(alg)]


def signature_sizes(alg: SignatureAlgorithm | str) -> SignatureSizes:
    return SIGNATURE_SIZES[signature_algorithm(alg)]


def check_length(what: str, value: bytes, expected: int, error: type[PqcError]) -> None:
    """Reject wrong-length input with a message that states lengths only."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes")
    if len(value) != expected:
        raise error(f"{what} must be {expected} bytes, got {len(value)}")


@dataclass(frozen=True, slots=True)
class KemKeyPair:
    """An ML-KEM key pair; the private part is the 64-byte seed ``d || z`` and never appears in repr.

    Equality compares algorithm and public key only (the public key is a function of the seed), so no
    comparison ever branches on secret bytes.
    """

    algorithm: KemAlgorithm
    public_key: bytes
    private_seed: bytes = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", bytes(self.public_key))
        object.__setattr__(self, "private_seed", bytes(self.private_seed))
        sizes = KEM_SIZES[self.algorithm]
        check_length(f"{self.algorithm} public key", self.public_key, sizes.public_key, InvalidKeyError)
        check_length(f"{self.algorithm} seed", self.private_seed, sizes.seed, InvalidKeyError)


@dataclass(frozen=True, slots=True)
class SignatureKeyPair:
    """An ML-DSA key pair; the private part is the 32-byte seed ``xi`` and never appears in repr."""

    algorithm: SignatureAlgorithm
    public_key: bytes
    private_seed: bytes = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", bytes(self.public_key))
        object.__setattr__(self, "private_seed", bytes(self.private_seed))
        sizes = SIGNATURE_SIZES[self.algorithm]
        check_length(f"{self.algorithm} public key", self.public_key, sizes.public_key, InvalidKeyError)
        check_length(f"{self.algorithm} seed", self.private_seed, sizes.seed, InvalidKeyError)


@runtime_checkable
class KemProvider(Protocol):
    """ML-KEM (FIPS 203) operations over seeds and raw encodings."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def generate(self, alg: KemAlgorithm, seed: bytes | None = None) -> KemKeyPair:
        """A key pair; from ``seed`` (``d || z``) when given, else from fresh randomness."""
        ...

    def public_key_from_seed(self, alg: KemAlgorithm, private_seed: bytes) -> bytes:
        """The encapsulation key that ``private_seed`` derives (FIPS 203 ML-KEM.KeyGen_internal)."""
        ...

    def encapsulate(self, alg: KemAlgorithm, public_key: bytes) -> tuple[bytes, bytes]:
        """``(ciphertext, shared_secret)`` for ``public_key``; raises InvalidKeyError on a bad key."""
        ...

    def decapsulate(self, alg: KemAlgorithm, private_seed: bytes, ciphertext: bytes) -> bytes:
        """The shared secret; a tampered ciphertext of the right length yields the implicit-rejection
        secret (never an error), a wrong-length one raises InvalidCiphertextError."""
        ...

    def decapsulator(self, alg: KemAlgorithm, private_seed: bytes) -> Callable[[bytes], bytes]:
        """``decapsulate`` bound to one long-lived key, expanded once: a KME's own ML-KEM key serves
        every hybrid request, and re-expanding its seed is most of a decapsulation's cost."""
        ...


@runtime_checkable
class SignatureProvider(Protocol):
    """Pure ML-DSA (FIPS 204) operations over seeds and raw encodings, with context strings."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def generate(self, alg: SignatureAlgorithm, seed: bytes | None = None) -> SignatureKeyPair:
        """A key pair; from ``seed`` (``xi``) when given, else from fresh randomness."""
        ...

    def public_key_from_seed(self, alg: SignatureAlgorithm, private_seed: bytes) -> bytes:
        """The public key that ``private_seed`` derives (FIPS 204 ML-DSA.KeyGen_internal)."""
        ...

    def sign(
        self, alg: SignatureAlgorithm, private_seed: bytes, message: bytes, context: bytes = b""
    ) -> bytes:
        """A (hedged) signature over ``message`` under ``context`` (at most 255 bytes)."""
        ...

    def signer(self, alg: SignatureAlgorithm, private_seed: bytes) -> Callable[[bytes, bytes], bytes]:
        """``sign(message, context)`` bound to one long-lived key, expanded once: a KME signs every
        peer message with its identity key, and expanding the seed is a third of a signature's cost."""
        ...

    def verify(
        self,
        alg: SignatureAlgorithm,
        public_key: bytes,
        message: bytes,
        signature: bytes,
        context: bytes = b"",
    ) -> bool:
        """True only for a valid signature. Never raises on a bad signature, message or context;
        raises InvalidKeyError only for a malformed public key."""
        ...
