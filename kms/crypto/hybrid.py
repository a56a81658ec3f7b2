"""Hybrid key combiner: QKD key + ML-KEM shared secret -> delivered key (docs/DECISIONS.md D-4).

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

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

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
        return KeyDeriver(b"", self).context(self.key_id, length_bytes)


@functools.lru_cache(maxsize=256)
def _sha384(data: bytes) -> bytes:
    """Every key of a request shares one public key and ciphertext: hash each once."""
    return hashlib.sha384(data).digest()


def lp(field: bytes) -> bytes:
    """Length-prefix a field: 4-byte big-endian length, then the bytes."""
    return len(field).to_bytes(4, "big") + field


# HKDF-Extract is HMAC keyed with the salt, which never changes: keyed once, copied per derivation
# (RFC 5869 extract, then pyca's HKDF-Expand; 6.1 against 8.1 us a key with HKDF from scratch).
_SHA384 = hashes.SHA384()
_EXTRACT = hmac.HMAC(SALT, _SHA384)


def _hkdf(ikm: bytes, info: bytes, length_bytes: int) -> bytes:
    if not 0 < length_bytes <= MAX_OUTPUT_BYTES:
        raise ValueError(f"output length must be 1..{MAX_OUTPUT_BYTES} bytes")
    extract = _EXTRACT.copy()
    extract.update(ikm)
    return HKDFExpand(_SHA384, length_bytes, info).derive(extract.finalize())


class KeyDeriver:
    """Derives the keys of one request (one ML-KEM secret, one context but for the key_ID).

    The context fields its keys share are encoded once: building and encoding the whole context per
    key cost more than the HKDF itself (5.5 against 7.5 us), and a request derives up to 128 keys at
    each end. ``shared.key_id`` is not used; each derivation names its key.
    """

    def __init__(self, kem_secret: bytes, shared: HybridContext) -> None:
        self._secret = kem_secret
        self._before = lp(shared.suite.encode())
        self._after = b"".join(
            lp(f)
            for f in (
                shared.master_kme_id.encode(),
                shared.slave_kme_id.encode(),
                shared.master_sae_id.encode(),
                shared.slave_sae_id.encode(),
                _sha384(shared.kem_public_key),
                _sha384(shared.kem_ciphertext),
            )
        )

    def context(self, key_id: str, length_bytes: int) -> bytes:
        """The encoded context of ``key_id`` (every field length-prefixed, the length in bits last)."""
        return b"".join(
            (self._before, lp(key_id.encode()), self._after, lp((length_bytes * 8).to_bytes(4, "big")))
        )

    def hybrid(self, qkd_key: bytes, key_id: str) -> bytes:
        """The delivered key for ``hybrid`` policy: as long as the QKD key it replaces."""
        if not qkd_key or not self._secret:
            raise ValueError("both the QKD key and the ML-KEM secret are required")
        length = len(qkd_key)
        return _hkdf(self._secret + qkd_key, _LP_HYBRID + self.context(key_id, length), length)

    def fallback(self, key_id: str, length_bytes: int) -> bytes:
        """The delivered key for the PQC fallback: ML-KEM alone, under its own label."""
        if not self._secret:
            raise ValueError("the ML-KEM secret is required")
        return _hkdf(self._secret, _LP_FALLBACK + self.context(key_id, length_bytes), length_bytes)


_LP_HYBRID = lp(LABEL_HYBRID)
_LP_FALLBACK = lp(LABEL_FALLBACK)


def combine_hybrid(qkd_key: bytes, kem_secret: bytes, ctx: HybridContext) -> bytes:
    """The delivered key for ``hybrid`` policy: as long as the QKD key it replaces."""
    return KeyDeriver(kem_secret, ctx).hybrid(qkd_key, ctx.key_id)


def derive_fallback(kem_secret: bytes, ctx: HybridContext, length_bytes: int) -> bytes:
    """The delivered key for the PQC fallback: ML-KEM alone, under its own label."""
    return KeyDeriver(kem_secret, ctx).fallback(ctx.key_id, length_bytes)
