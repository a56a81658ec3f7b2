"""Default PQC backend: pyca/cryptography over OpenSSL (docs/DECISIONS.md D-6).

Always present (cryptography is a hard dependency). Keys are rebuilt from their seeds for every
private-key operation, so no expanded secret key outlives the call that needed it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Final

import cryptography
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from kms.crypto.pqc.base import (
    KEM_SIZES,
    ML_DSA_MAX_CONTEXT_BYTES,
    SIGNATURE_SIZES,
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

_KemPrivate = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey
_KemPublic = mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey
_SigPrivate = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
_SigPublic = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey

_KEM_PRIVATE: Final[dict[KemAlgorithm, type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]]] = {
    KemAlgorithm.ML_KEM_768: mlkem.MLKEM768PrivateKey,
    KemAlgorithm.ML_KEM_1024: mlkem.MLKEM1024PrivateKey,
}
_KEM_PUBLIC: Final[dict[KemAlgorithm, type[mlkem.MLKEM768PublicKey] | type[mlkem.MLKEM1024PublicKey]]] = {
    KemAlgorithm.ML_KEM_768: mlkem.MLKEM768PublicKey,
    KemAlgorithm.ML_KEM_1024: mlkem.MLKEM1024PublicKey,
}
_SIG_PRIVATE: Final[
    dict[
        SignatureAlgorithm,
        type[mldsa.MLDSA44PrivateKey] | type[mldsa.MLDSA65PrivateKey] | type[mldsa.MLDSA87PrivateKey],
    ]
] = {
    SignatureAlgorithm.ML_DSA_44: mldsa.MLDSA44PrivateKey,
    SignatureAlgorithm.ML_DSA_65: mldsa.MLDSA65PrivateKey,
    SignatureAlgorithm.ML_DSA_87: mldsa.MLDSA87PrivateKey,
}
_SIG_PUBLIC: Final[
    dict[
        SignatureAlgorithm,
        type[mldsa.MLDSA44PublicKey] | type[mldsa.MLDSA65PublicKey] | type[mldsa.MLDSA87PublicKey],
    ]
] = {
    SignatureAlgorithm.ML_DSA_44: mldsa.MLDSA44PublicKey,
    SignatureAlgorithm.ML_DSA_65: mldsa.MLDSA65PublicKey,
    SignatureAlgorithm.ML_DSA_87: mldsa.MLDSA87PublicKey,
}

BACKEND_NAME: Final = "pyca"


def openssl_version() -> str:
    """The OpenSSL that cryptography is linked against (its wheels bundle their own)."""
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


def _version() -> str:
    return f"cryptography {cryptography.__version__} ({openssl_version()})"


class PycaKemProvider:
    """ML-KEM-768/1024 on pyca/cryptography."""

    name: str = BACKEND_NAME

    def __init__(self) -> None:
        self.version: str = _version()

    def _private(self, alg: KemAlgorithm, private_seed: bytes) -> _KemPrivate:
        check_length(f"{alg} seed", private_seed, KEM_SIZES[alg].seed, InvalidKeyError)
        try:
            return _KEM_PRIVATE[alg].from_seed_bytes(bytes(private_seed))
        except ValueError:
            raise InvalidKeyError(f"{alg} seed rejected") from None

    def generate(self, alg: KemAlgorithm, seed: bytes | None = None) -> KemKeyPair:
        alg = kem_algorithm(alg)
        seed = os.urandom(KEM_SIZES[alg].seed) if seed is None else bytes(seed)
        return KemKeyPair(alg, self.public_key_from_seed(alg, seed), seed)

    def public_key_from_seed(self, alg: KemAlgorithm, private_seed: bytes) -> bytes:
        alg = kem_algorithm(alg)
        return self._private(alg, private_seed).public_key().public_bytes_raw()

    def encapsulate(self, alg: KemAlgorithm, public_key: bytes) -> tuple[bytes, bytes]:
        alg = kem_algorithm(alg)
        check_length(f"{alg} public key", public_key, KEM_SIZES[alg].public_key, InvalidKeyError)
        try:
            pub: _KemPublic = _KEM_PUBLIC[alg].from_public_bytes(bytes(public_key))
        except ValueError:
            # Right length, so it failed the FIPS 203 §7.2 modulus check.
            raise InvalidKeyError(f"{alg} public key fails the FIPS 203 encapsulation key check") from None
        shared_secret, ciphertext = pub.encapsulate()
        return ciphertext, shared_secret

    def decapsulate(self, alg: KemAlgorithm, private_seed: bytes, ciphertext: bytes) -> bytes:
        alg = kem_algorithm(alg)
        check_length(f"{alg} ciphertext", ciphertext, KEM_SIZES[alg].ciphertext, InvalidCiphertextError)
        private = self._private(alg, private_seed)
        try:
            return private.decapsulate(bytes(ciphertext))
        except ValueError:
            raise InvalidCiphertextError(f"{alg} ciphertext rejected") from None

    def decapsulator(self, alg: KemAlgorithm, private_seed: bytes) -> Callable[[bytes], bytes]:
        alg = kem_algorithm(alg)
        private = self._private(alg, private_seed)
        size = KEM_SIZES[alg].ciphertext

        def decapsulate(ciphertext: bytes) -> bytes:
            check_length(f"{alg} ciphertext", ciphertext, size, InvalidCiphertextError)
            try:
                return private.decapsulate(bytes(ciphertext))
            except ValueError:
                raise InvalidCiphertextError(f"{alg} ciphertext rejected") from None

        return decapsulate


class PycaSignatureProvider:
    """ML-DSA-44/65/87 (pure, hedged signing) on pyca/cryptography."""

    name: str = BACKEND_NAME

    def __init__(self) -> None:
        self.version: str = _version()

    def _private(self, alg: SignatureAlgorithm, private_seed: bytes) -> _SigPrivate:
        check_length(f"{alg} seed", private_seed, SIGNATURE_SIZES[alg].seed, InvalidKeyError)
        try:
            return _SIG_PRIVATE[alg].from_seed_bytes(bytes(private_seed))
        except ValueError:
            raise InvalidKeyError(f"{alg} seed rejected") from None

    def generate(self, alg: SignatureAlgorithm, seed: bytes | None = None) -> SignatureKeyPair:
        alg = signature_algorithm(alg)
        seed = os.urandom(SIGNATURE_SIZES[alg].seed) if seed is None else bytes(seed)
        return SignatureKeyPair(alg, self.public_key_from_seed(alg, seed), seed)

    def public_key_from_seed(self, alg: SignatureAlgorithm, private_seed: bytes) -> bytes:
        alg = signature_algorithm(alg)
        return self._private(alg, private_seed).public_key().public_bytes_raw()

    def sign(
        self, alg: SignatureAlgorithm, private_seed: bytes, message: bytes, context: bytes = b""
    ) -> bytes:
        return self.signer(alg, private_seed)(message, context)

    def signer(self, alg: SignatureAlgorithm, private_seed: bytes) -> Callable[[bytes, bytes], bytes]:
        alg = signature_algorithm(alg)
        private = self._private(alg, private_seed)

        def sign(message: bytes, context: bytes = b"") -> bytes:
            if len(context) > ML_DSA_MAX_CONTEXT_BYTES:
                raise PqcError(f"ML-DSA context must be at most {ML_DSA_MAX_CONTEXT_BYTES} bytes")
            return private.sign(bytes(message), bytes(context) if context else None)

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
        if len(context) > ML_DSA_MAX_CONTEXT_BYTES:
            return False
        if len(signature) != SIGNATURE_SIZES[alg].signature:
            return False
        pub = _public_key(alg, bytes(public_key))
        try:
            pub.verify(bytes(signature), bytes(message), bytes(context) if context else None)
        except (InvalidSignature, ValueError):
            return False
        return True


@functools.lru_cache(maxsize=256)
def _public_key(alg: SignatureAlgorithm, public_key: bytes) -> _SigPublic:
    """The parsed public key, kept: a KME checks the same few peers' signatures on every message
    (parsing one was ~7 % of a signature check). A rejected key is not cached; it raises each time."""
    try:
        pub: _SigPublic = _SIG_PUBLIC[alg].from_public_bytes(public_key)
    except ValueError:
        raise InvalidKeyError(f"{alg} public key rejected") from None
    return pub
