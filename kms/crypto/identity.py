"""The KME's own post-quantum identity: an ML-DSA-65 signing key and an ML-KEM-768 key pair.

Keys are versioned rows in ``kme_keys``; each private seed is sealed under the KEK (AAD binds purpose
and version). Rotation adds a new active version and retires the old one, whose public key stays so
old signatures and checkpoints still verify. A retired KEM seed is kept (sealed) while keys
encapsulated to it may still be fetched; ``destroy_retired`` zeroises it afterwards.

Crypto does no SQL: :class:`KmeIdentity` makes, seals and uses keys, and keeps them through an
:class:`IdentityKeyStore` — ``kms.service.identity_keys.IdentityKeys``, which runs the transactions
(audited) over ``kms.storage.identity_repository``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kms.crypto.envelope import Envelope
from kms.crypto.pqc.base import KemAlgorithm, KemProvider, SignatureAlgorithm, SignatureProvider

SIGN, KEM = "sign", "kem"
DEFAULT_SIGNATURE = SignatureAlgorithm.ML_DSA_65
DEFAULT_KEM = KemAlgorithm.ML_KEM_768


@dataclass(frozen=True)
class PublicKeyInfo:
    purpose: str
    algorithm: str
    version: int
    public_key: bytes
    state: str

    def to_json(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose,
            "algorithm": self.algorithm,
            "version": self.version,
            "public_key": self.public_key.hex(),
            "state": self.state,
        }


@dataclass(frozen=True, repr=False)
class NewKey:
    """A freshly generated key version, its private seed sealed under the KEK, ready to be stored."""

    purpose: str
    algorithm: str
    version: int
    public_key: bytes
    sealed_seed: bytes
    kek_id: str


KeyMaker = Callable[[str, int], NewKey]
"""(purpose, version) -> a new key of that version: called by the store inside its transaction."""


class IdentityKeyStore(Protocol):
    """Where the KME's key versions are kept (``kms.service.identity_keys.IdentityKeys``)."""

    def active(self, purpose: str) -> PublicKeyInfo | None: ...

    def public_keys(self) -> list[PublicKeyInfo]: ...

    def sealed_seed(self, purpose: str, version: int) -> bytes | None: ...

    def create_missing(self, purposes: Sequence[str], make: KeyMaker) -> None: ...

    def rotate(self, purpose: str, make: KeyMaker, actor: str) -> int: ...

    def destroy_retired(self, purpose: str, version: int, actor: str) -> bool: ...


def seed_aad(purpose: str, version: int) -> bytes:
    """Associated data of a sealed identity-key seed (also what a KEK rotation re-seals it with)."""
    return f"qkms/kme-key/{purpose}/{version}".encode()


class KmeIdentity:
    """Creates, rotates and uses the KME's PQC keys. Unsealed seeds are cached in memory."""

    def __init__(
        self,
        store: IdentityKeyStore,
        envelope: Envelope,
        signer: SignatureProvider,
        kem: KemProvider,
        signature_algorithm: SignatureAlgorithm = DEFAULT_SIGNATURE,
        kem_algorithm: KemAlgorithm = DEFAULT_KEM,
    ) -> None:
        self.store = store
        self.envelope = envelope
        self.signer = signer
        self.kem = kem
        self.signature_algorithm = signature_algorithm
        self.kem_algorithm = kem_algorithm
        self._seeds: dict[tuple[str, int], bytes] = {}
        self._public: dict[tuple[str, int], PublicKeyInfo] = {}
        self._active: dict[str, tuple[float, PublicKeyInfo]] = {}
        self._decapsulators: dict[int, Callable[[bytes], bytes]] = {}
        self._signers: dict[int, Callable[[bytes, bytes], bytes]] = {}
        self._lock = threading.Lock()

    # -- creation and rotation ----------------------------------------------------------------
    def ensure(self) -> None:
        """Create version 1 of each key on first start."""
        self.store.create_missing((SIGN, KEM), self._new_key)

    def rotate(self, purpose: str, actor: str = "operator") -> int:
        """Make a new active version of ``purpose`` ('sign' or 'kem'); the old one is retired.
        The rotation is audited in the same transaction."""
        if purpose not in (SIGN, KEM):
            raise ValueError("purpose must be 'sign' or 'kem'")
        version = self.store.rotate(purpose, self._new_key, actor)
        with self._lock:
            self._active.pop(purpose, None)
        return version

    def _new_key(self, purpose: str, version: int) -> NewKey:
        if purpose == SIGN:
            sig_pair = self.signer.generate(self.signature_algorithm)
            algorithm, public, seed = (
                self.signature_algorithm.value,
                sig_pair.public_key,
                sig_pair.private_seed,
            )
        else:
            kem_pair = self.kem.generate(self.kem_algorithm)
            algorithm, public, seed = self.kem_algorithm.value, kem_pair.public_key, kem_pair.private_seed
        sealer = self.envelope.writer()
        sealed = sealer.seal(seed, seed_aad(purpose, version))
        return NewKey(purpose, algorithm, version, public, sealed, sealer.kek_id)

    # -- reading ------------------------------------------------------------------------------
    def public_keys(self) -> list[PublicKeyInfo]:
        return self.store.public_keys()

    def active_public(self, purpose: str, max_age: float = 2.0) -> PublicKeyInfo:
        """The active key's public part; cached briefly so a rotation elsewhere is seen within ``max_age`` s."""
        now = time.monotonic()
        with self._lock:
            cached = self._active.get(purpose)
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        info = self.store.active(purpose)
        if info is None:
            raise RuntimeError(
                f"the KME has no active {purpose} key; run the server once or `qkms keys rotate`"
            )
        with self._lock:
            self._active[purpose] = (now, info)
        return info

    def public_key(self, purpose: str, version: int) -> PublicKeyInfo:
        """A given version's public key (public keys never change, so they are cached for good)."""
        with self._lock:
            cached = self._public.get((purpose, version))
        if cached is not None:
            return cached
        infos = self.public_keys()
        with self._lock:
            for info in infos:
                self._public[(info.purpose, info.version)] = info
            found = self._public.get((purpose, version))
        if found is None:
            raise RuntimeError(f"{purpose} key version {version} is unknown")
        return found

    def _seed(self, purpose: str, version: int) -> bytes:
        with self._lock:
            cached = self._seeds.get((purpose, version))
        if cached is not None:
            return cached
        sealed = self.store.sealed_seed(purpose, version)
        if sealed is None:
            raise RuntimeError(f"{purpose} key version {version} is not available (destroyed or unknown)")
        seed = self.envelope.open(sealed, seed_aad(purpose, version))
        with self._lock:
            self._seeds[(purpose, version)] = seed
        return seed

    # -- use ----------------------------------------------------------------------------------
    def sign(self, message: bytes, context: bytes) -> tuple[int, str, bytes]:
        """Sign with the active key: (version, algorithm, signature)."""
        info = self.active_public(SIGN)
        with self._lock:
            bound = self._signers.get(info.version)
        if bound is None:  # expanded once and kept like its seed
            bound = self.signer.signer(SignatureAlgorithm(info.algorithm), self._seed(SIGN, info.version))
            with self._lock:
                self._signers[info.version] = bound
        return info.version, info.algorithm, bound(message, context)

    def verify(self, version: int, message: bytes, signature: bytes, context: bytes) -> bool:
        try:
            info = self.public_key(SIGN, version)
        except RuntimeError:
            return False
        return self.signer.verify(
            SignatureAlgorithm(info.algorithm), info.public_key, message, signature, context
        )

    def decapsulate(self, version: int, ciphertext: bytes) -> bytes:
        """Decapsulate with this KME's KEM key ``version``, expanded once and kept like its seed."""
        with self._lock:
            bound = self._decapsulators.get(version)
        if bound is None:
            info = self.public_key(KEM, version)
            bound = self.kem.decapsulator(KemAlgorithm(info.algorithm), self._seed(KEM, version))
            with self._lock:
                self._decapsulators[version] = bound
        return bound(ciphertext)

    def destroy_retired(self, purpose: str, version: int, actor: str = "operator") -> bool:
        """Zeroise a retired key's sealed seed (audited); its public key stays for verification.
        Returns False if that version is not retired."""
        done = self.store.destroy_retired(purpose, version, actor)
        with self._lock:
            self._seeds.pop((purpose, version), None)
            self._public.pop((purpose, version), None)
            if purpose == KEM:
                self._decapsulators.pop(version, None)
            else:
                self._signers.pop(version, None)
        return bool(done)
