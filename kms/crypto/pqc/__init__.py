"""Post-quantum cryptography for QKMS: ML-KEM (FIPS 203) and ML-DSA (FIPS 204) behind one interface.

Use :func:`get_kem_provider` / :func:`get_signature_provider`; the default backend is pyca/cryptography,
the optional ``"liboqs"`` backend is handed out only after it proves interoperability with it.
Importing this package never imports ``oqs``.
"""

from kms.crypto.pqc.base import (
    KEM_SIZES,
    SIGNATURE_SIZES,
    BackendUnavailableError,
    InvalidCiphertextError,
    InvalidKeyError,
    KemAlgorithm,
    KemKeyPair,
    KemProvider,
    KemSizes,
    PqcError,
    SignatureAlgorithm,
    SignatureKeyPair,
    SignatureProvider,
    SignatureSizes,
    UnsupportedAlgorithmError,
    kem_algorithm,
    kem_sizes,
    signature_algorithm,
    signature_sizes,
)
from kms.crypto.pqc.registry import (
    DEFAULT_BACKEND,
    BackendReport,
    available_backends,
    backend_report,
    get_kem_provider,
    get_signature_provider,
)
from kms.crypto.pqc.selftest import CheckResult

__all__ = [
    "DEFAULT_BACKEND",
    "KEM_SIZES",
    "SIGNATURE_SIZES",
    "BackendReport",
    "BackendUnavailableError",
    "CheckResult",
    "InvalidCiphertextError",
    "InvalidKeyError",
    "KemAlgorithm",
    "KemKeyPair",
    "KemProvider",
    "KemSizes",
    "PqcError",
    "SignatureAlgorithm",
    "SignatureKeyPair",
    "SignatureProvider",
    "SignatureSizes",
    "UnsupportedAlgorithmError",
    "available_backends",
    "backend_report",
    "get_kem_provider",
    "get_signature_provider",
    "kem_algorithm",
    "kem_sizes",
    "signature_algorithm",
    "signature_sizes",
]
