"""Post-quantum authentication of a simulated link's classical channel (docs/DECISIONS.md D-5).

QKD is only secure over an authenticated classical channel. The simulator exposes an
``Authenticator`` hook (``sign(payload) -> tag``, ``verify(payload, tag) -> bool``, called for every
message with its sequence number and direction in the payload header); this module plugs ML-DSA in:

- ``MlDsaMessageAuthenticator``: every message is signed with the sending device's ML-DSA key and
  verified with its public key. Simple, but ~4 ms per signature on the default backend.
- ``PqSessionAuthenticator`` (default): the two devices run an ML-DSA-signed ML-KEM handshake — Alice
  signs an ephemeral ML-KEM public key, Bob verifies, encapsulates and signs the transcript, Alice
  verifies and decapsulates — and derive an HMAC-SHA-384 key with HKDF over the transcript; each
  message then carries an HMAC tag. The handshake is repeated every ``rekey_after`` messages. This is
  the signed-handshake-then-MAC structure TLS 1.3 uses, and keeps post-processing real-time.

A tag that fails aborts the block (the simulator raises ``ChannelAuthenticationError``).
"""

from __future__ import annotations

import hashlib
import hmac
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kms.crypto.hybrid import lp
from kms.crypto.pqc.base import (
    KemAlgorithm,
    KemProvider,
    SignatureAlgorithm,
    SignatureKeyPair,
    SignatureProvider,
)

_HS1, _HS2 = b"qkms-channel-handshake-1", b"qkms-channel-handshake-2"
_MSG = b"qkms-channel-message"


class HandshakeError(RuntimeError):
    """The authenticated key exchange failed: a signature did not verify."""


def _sender(payload: bytes) -> int:
    """The direction byte of the simulator's message header (``>QB``: seq, then 0=Alice / 1=Bob)."""
    return payload[8]


class MlDsaMessageAuthenticator:
    """Each message signed by its sender's ML-DSA key (Alice's or Bob's device identity)."""

    def __init__(
        self,
        signer: SignatureProvider,
        alice: SignatureKeyPair,
        bob: SignatureKeyPair,
        algorithm: SignatureAlgorithm = SignatureAlgorithm.ML_DSA_65,
    ) -> None:
        self._signer, self._alg = signer, algorithm
        self._keys = (alice, bob)

    def sign(self, payload: bytes) -> bytes:
        return self._signer.sign(self._alg, self._keys[_sender(payload)].private_seed, payload, _MSG)

    def verify(self, payload: bytes, tag: bytes) -> bool:
        public = self._keys[_sender(payload)].public_key
        return self._signer.verify(self._alg, public, payload, tag, _MSG)

    def __repr__(self) -> str:
        return f"MlDsaMessageAuthenticator({self._alg.value})"


class PqSessionAuthenticator:
    """HMAC-SHA-384 tags under a key agreed by an ML-DSA-signed ML-KEM handshake."""

    def __init__(
        self,
        signer: SignatureProvider,
        kem: KemProvider,
        alice: SignatureKeyPair,
        bob_public_key: bytes,
        bob: SignatureKeyPair,
        alice_public_key: bytes,
        context: bytes,
        *,
        signature_algorithm: SignatureAlgorithm = SignatureAlgorithm.ML_DSA_65,
        kem_algorithm: KemAlgorithm = KemAlgorithm.ML_KEM_768,
        rekey_after: int = 100_000,
    ) -> None:
        """``alice``/``bob`` are each device's own key pair; ``*_public_key`` is what the *other*
        device has pinned for it (equal to the real public key unless someone is impersonating)."""
        self._signer, self._kem = signer, kem
        self._sig_alg, self._kem_alg = signature_algorithm, kem_algorithm
        self._alice, self._bob = alice, bob
        self._alice_pinned, self._bob_pinned = alice_public_key, bob_public_key
        self._context = context
        self._rekey_after = rekey_after
        self._lock = threading.Lock()
        self._epoch = 0
        self._tags = 0
        self._key = self._handshake()

    @property
    def epoch(self) -> int:
        return self._epoch

    def _handshake(self) -> bytes:
        ctx = lp(self._context) + lp(self._epoch.to_bytes(8, "big"))
        ephemeral = self._kem.generate(self._kem_alg)  # Alice
        hello = ctx + lp(ephemeral.public_key)
        sig_a = self._signer.sign(self._sig_alg, self._alice.private_seed, hello, _HS1)
        if not self._signer.verify(self._sig_alg, self._alice_pinned, hello, sig_a, _HS1):  # Bob
            raise HandshakeError("Alice's handshake signature does not verify with her pinned key")
        ciphertext, secret_bob = self._kem.encapsulate(self._kem_alg, ephemeral.public_key)
        reply = hello + lp(sig_a) + lp(ciphertext)
        sig_b = self._signer.sign(self._sig_alg, self._bob.private_seed, reply, _HS2)
        if not self._signer.verify(self._sig_alg, self._bob_pinned, reply, sig_b, _HS2):  # Alice
            raise HandshakeError("Bob's handshake signature does not verify with his pinned key")
        secret_alice = self._kem.decapsulate(self._kem_alg, ephemeral.private_seed, ciphertext)
        if not hmac.compare_digest(secret_alice, secret_bob):
            raise HandshakeError("the two ends derived different channel keys")
        transcript = hashlib.sha384(reply + lp(sig_b)).digest()
        return HKDF(
            algorithm=hashes.SHA384(), length=48, salt=transcript, info=b"qkms channel MAC key v1"
        ).derive(secret_alice)

    def sign(self, payload: bytes) -> bytes:
        with self._lock:
            if self._tags >= self._rekey_after:
                self._epoch += 1
                self._tags = 0
                self._key = self._handshake()
            self._tags += 1
            key, epoch = self._key, self._epoch
        return epoch.to_bytes(4, "big") + hmac.new(key, payload, hashlib.sha384).digest()

    def verify(self, payload: bytes, tag: bytes) -> bool:
        with self._lock:
            key, epoch = self._key, self._epoch
        if len(tag) != 4 + 48 or int.from_bytes(tag[:4], "big") != epoch:
            return False
        return hmac.compare_digest(tag[4:], hmac.new(key, payload, hashlib.sha384).digest())

    def __repr__(self) -> str:
        return f"PqSessionAuthenticator({self._sig_alg.value}+{self._kem_alg.value}, epoch={self._epoch})"


def device_authenticator(mode: str, link_id: str) -> MlDsaMessageAuthenticator | PqSessionAuthenticator:
    """The authenticator for a simulated device pair: fresh ML-DSA-65 identities for both devices."""
    from kms.crypto.pqc.registry import get_kem_provider, get_signature_provider

    signer = get_signature_provider()
    alice = signer.generate(SignatureAlgorithm.ML_DSA_65)
    bob = signer.generate(SignatureAlgorithm.ML_DSA_65)
    if mode == "ml-dsa-per-message":
        return MlDsaMessageAuthenticator(signer, alice, bob)
    if mode == "ml-dsa-session":
        return PqSessionAuthenticator(
            signer,
            get_kem_provider(),
            alice,
            bob.public_key,
            bob,
            alice.public_key,
            f"qkms-link/{link_id}".encode(),
        )
    raise ValueError("channel_auth must be 'ml-dsa-session' or 'ml-dsa-per-message'")
