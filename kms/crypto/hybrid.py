"""Hybrid key combiner: QKD key + ML-KEM shared secret -> delivered key (DESIGN.md #4).

A two-step KDF after NIST SP 800-56C rev. 2 (extract-then-expand, HKDF with SHA-384, RFC 5869):

    K = HKDF-SHA-384(salt, IKM = ss_mlkem || k_qkd, info = lp(label) || context)

The context binds everything the two ends agree on — suite, key_ID, both KME IDs, master and slave
SAE IDs, SHA-384 of the ML-KEM public key and of the ciphertext, and the output length — each field
length-prefixed (4-byte big-endian) so no two different contexts encode to the same bytes. The key is
secret if *either* input is: an attacker must know both k_qkd and ss_mlkem to compute it.

For the PQC fallback (no QKD bits available, policy allows it) the IKM is ``ss_mlkem`` alone and the
label differs, so a fallback key can never collide with a hybrid one.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL_HYBRID = b"QKMS hybrid key v1: ML-KEM || QKD"
LABEL_FALLBACK = b"QKMS PQC fallback key v1: ML-KEM only"
SALT = hashlib.sha384(b"QKMS hybrid KDF salt v1").digest()
MAX_OUTPUT_BYTES = 255 * 48  # HKDF-SHA-384 limit


@dataclass(frozen=True)
class HybridContext:
    """What both ends bind into every derived key."""

    suite: str
    key_id: str
    master_kme_id: str
    slave_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    kem_public_key: bytes
    kem_ciphertext: bytes

    def encode(self, length_bytes: int) -> bytes:
        fields = [
            self.suite.encode(),
            self.key_id.encode(),
            self.master_kme_id.encode(),
            self.slave_kme_id.encode(),
            self.master_sae_id.encode(),
            self.slave_sae_id.encode(),
            _sha384(self.kem_public_key),
            _sha384(self.kem_ciphertext),
            (length_bytes * 8).to_bytes(4, "big"),
        ]
        return b"".join(lp(f) for f in fields)


@functools.lru_cache(maxsize=256)
def _sha384(data: bytes) -> bytes:
    """Every key of a request shares one public key and ciphertext: hash each once."""
    return hashlib.sha384(data).digest()


def lp(field: bytes) -> bytes:
    """Length-prefix a field: 4-byte big-endian length, then the bytes."""
    return len(field).to_bytes(4, "big") + field


def _hkdf(ikm: bytes, info: bytes, length_bytes: int) -> bytes:
    if not 0 < length_bytes <= MAX_OUTPUT_BYTES:
        raise ValueError(f"output length must be 1..{MAX_OUTPUT_BYTES} bytes")
    return HKDF(algorithm=hashes.SHA384(), length=length_bytes, salt=SALT, info=info).derive(ikm)


def combine_hybrid(qkd_key: bytes, kem_secret: bytes, ctx: HybridContext) -> bytes:
    """The delivered key for ``hybrid`` policy: as long as the QKD key it replaces."""
    if not qkd_key or not kem_secret:
        raise ValueError("both the QKD key and the ML-KEM secret are required")
    length = len(qkd_key)
    return _hkdf(kem_secret + qkd_key, lp(LABEL_HYBRID) + ctx.encode(length), length)


def derive_fallback(kem_secret: bytes, ctx: HybridContext, length_bytes: int) -> bytes:
    """The delivered key for the PQC fallback: ML-KEM alone, under its own label."""
    if not kem_secret:
        raise ValueError("the ML-KEM secret is required")
    return _hkdf(kem_secret, lp(LABEL_FALLBACK) + ctx.encode(length_bytes), length_bytes)
