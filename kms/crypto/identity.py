"""The KME's own post-quantum identity: an ML-DSA-65 signing key and an ML-KEM-768 key pair.

Keys are versioned rows in ``kme_keys``; each private seed is sealed under the KEK (AAD binds purpose
and version). Rotation adds a new active version and retires the old one, whose public key stays so
old signatures and checkpoints still verify. A retired KEM seed is kept (sealed) while keys
encapsulated to it may still be fetched; ``destroy_retired`` zeroises it afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from kms.crypto.envelope import Envelope
from kms.crypto.pqc.base import KemAlgorithm, KemProvider, SignatureAlgorithm, SignatureProvider
from kms.storage import audit_repository
from kms.storage.database import Database
from kms.storage.schema import kme_keys

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


def _aad(purpose: str, version: int) -> bytes:
    return f"qkms/kme-key/{purpose}/{version}".encode()


class KmeIdentity:
    """Loads, creates, rotates and uses the KME's PQC keys. Unsealed seeds are cached in memory."""

    def __init__(
        self,
        db: Database,
        envelope: Envelope,
        signer: SignatureProvider,
        kem: KemProvider,
        signature_algorithm: SignatureAlgorithm = DEFAULT_SIGNATURE,
        kem_algorithm: KemAlgorithm = DEFAULT_KEM,
    ) -> None:
        self.db = db
        self.envelope = envelope
        self.signer = signer
        self.kem = kem
        self.signature_algorithm = signature_algorithm
        self.kem_algorithm = kem_algorithm
        self._seeds: dict[tuple[str, int], bytes] = {}
        self._public: dict[tuple[str, int], PublicKeyInfo] = {}
        self._active: dict[str, tuple[float, PublicKeyInfo]] = {}
        self._decapsulators: dict[int, Callable[[bytes], bytes]] = {}
        self._lock = threading.Lock()

    # -- creation and rotation ----------------------------------------------------------------
    def ensure(self) -> None:
        """Create version 1 of each key on first start."""
        with self.db.write() as conn:
            for purpose in (SIGN, KEM):
                if self._active_row(conn, purpose) is None:
                    self._create(conn, purpose)

    def rotate(self, purpose: str, actor: str = "operator") -> int:
        """Make a new active version of ``purpose`` ('sign' or 'kem'); the old one is retired.
        The rotation is audited in the same transaction."""
        if purpose not in (SIGN, KEM):
            raise ValueError("purpose must be 'sign' or 'kem'")
        now = datetime.now(UTC)
        with self.db.write() as conn:
            conn.execute(
                update(kme_keys)
                .where(kme_keys.c.purpose == purpose, kme_keys.c.state == "active")
                .values(state="retired", retired_at=now)
            )
            version = self._create(conn, purpose)
            audit_repository.append(conn, now, [(actor, "identity.rotated", purpose, {"version": version})])
        with self._lock:
            self._active.pop(purpose, None)
        return version

    def _create(self, conn: Connection, purpose: str) -> int:
        version = (
            int(
                conn.execute(
                    select(func.coalesce(func.max(kme_keys.c.version), 0)).where(
                        kme_keys.c.purpose == purpose
                    )
                ).scalar_one()
            )
            + 1
        )
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
        conn.execute(
            insert(kme_keys).values(
                purpose=purpose,
                algorithm=algorithm,
                version=version,
                public_key=public,
                sealed_seed=self.envelope.seal(seed, _aad(purpose, version)),
                kek_id=self.envelope.kek_id,
                state="active",
                created_at=datetime.now(UTC),
            )
        )
        return version

    # -- reading ------------------------------------------------------------------------------
    @staticmethod
    def _active_row(conn: Connection, purpose: str) -> Any:
        return conn.execute(
            select(kme_keys).where(kme_keys.c.purpose == purpose, kme_keys.c.state == "active")
        ).first()

    def public_keys(self) -> list[PublicKeyInfo]:
        with self.db.read() as conn:
            rows = conn.execute(select(kme_keys).order_by(kme_keys.c.purpose, kme_keys.c.version)).all()
        return [PublicKeyInfo(r.purpose, r.algorithm, r.version, bytes(r.public_key), r.state) for r in rows]

    def active_public(self, purpose: str, max_age: float = 2.0) -> PublicKeyInfo:
        """The active key's public part; cached briefly so a rotation elsewhere is seen within ``max_age`` s."""
        now = time.monotonic()
        with self._lock:
            cached = self._active.get(purpose)
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        with self.db.read() as conn:
            row = self._active_row(conn, purpose)
        if row is None:
            raise RuntimeError(
                f"the KME has no active {purpose} key; run the server once or `qkms keys rotate`"
            )
        info = PublicKeyInfo(row.purpose, row.algorithm, row.version, bytes(row.public_key), row.state)
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
        with self.db.read() as conn:
            row = conn.execute(
                select(kme_keys.c.sealed_seed).where(
                    kme_keys.c.purpose == purpose, kme_keys.c.version == version
                )
            ).first()
        if row is None or row.sealed_seed is None:
            raise RuntimeError(f"{purpose} key version {version} is not available (destroyed or unknown)")
        seed = self.envelope.open(row.sealed_seed, _aad(purpose, version))
        with self._lock:
            self._seeds[(purpose, version)] = seed
        return seed

    # -- use ----------------------------------------------------------------------------------
    def sign(self, message: bytes, context: bytes) -> tuple[int, str, bytes]:
        """Sign with the active key: (version, algorithm, signature)."""
        info = self.active_public(SIGN)
        alg = SignatureAlgorithm(info.algorithm)
        return (
            info.version,
            info.algorithm,
            self.signer.sign(alg, self._seed(SIGN, info.version), message, context),
        )

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
        now = datetime.now(UTC)
        with self.db.write() as conn:
            done = conn.execute(
                update(kme_keys)
                .where(
                    kme_keys.c.purpose == purpose,
                    kme_keys.c.version == version,
                    kme_keys.c.state == "retired",
                )
                .values(sealed_seed=None, state="destroyed")
            ).rowcount
            if done:
                audit_repository.append(
                    conn, now, [(actor, "identity.destroyed", purpose, {"version": version})]
                )
        with self._lock:
            self._seeds.pop((purpose, version), None)
            self._public.pop((purpose, version), None)
            if purpose == KEM:
                self._decapsulators.pop(version, None)
        return bool(done)
