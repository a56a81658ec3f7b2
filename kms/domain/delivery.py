"""Key delivery as ETSI GS QKD 014 defines it: status, Get key (master), Get key with key IDs (slave).

This is the domain core: it checks requests against the KME's limits, the SAE registry and the pair's
policy, and runs each request as one database transaction through the repositories — the pool, the
key records and the audit trail together, so a request that cannot be audited does not happen
(fail closed). It knows nothing of HTTP; the API layer turns its errors into status codes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.crypto.hybrid import HybridContext, KeyDeriver
from kms.crypto.identity import KmeIdentity
from kms.crypto.pqc.base import KemAlgorithm
from kms.domain import errors
from kms.domain.errors import InvalidRequest, NotEntitled, ServiceUnavailable
from kms.domain.group_commit import AfterCommit, AuditEntry, Unit, run_unit
from kms.domain.key_ids import canonical_key_id
from kms.domain.lifecycle import KeyState
from kms.domain.policy import POLICY_FALLBACK, Mode, PairPolicy, PolicyBook
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.storage import audit_repository as audit
from kms.storage import pool_repository as pool
from kms.storage.database import Database, savepoint


# Not frozen: made per key on the delivery hot path, where a frozen dataclass's __init__ cost
# ~8x a slotted one's (1.6 against 0.2 us for a StoredKey). Treat instances as read-only.
@dataclass(repr=False, slots=True)
class DeliveredKey:
    """A key on its way to an SAE. The repr never shows the material."""

    key_id: str
    material: bytes

    def __repr__(self) -> str:
        return f"DeliveredKey(key_id={self.key_id!r}, bits={len(self.material) * 8})"


@dataclass(frozen=True)
class StatusView:
    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int
    extension: Mapping[str, Any]


class KeyDeliveryService:
    """One KME's delivery rules over its pool."""

    def __init__(
        self,
        kme_id: str,
        pool_cfg: PoolSection,
        db: Database,
        envelope: Envelope,
        registry: SaeRegistry,
        policies: PolicyBook,
        identity: KmeIdentity,
        remote: RemoteDelivery | None = None,
    ) -> None:
        self.kme_id = kme_id
        self.cfg = pool_cfg
        self.db = db
        self.envelope = envelope
        self.registry = registry
        self.policies = policies
        self.identity = identity
        self.remote = remote

    # -- lookups -------------------------------------------------------------------------------
    def _known_sae(self, sae_id: str, role: str) -> SaeInfo:
        info = self.registry.get(sae_id)
        if info is None or not info.enabled or info.role != "sae":
            raise InvalidRequest(f"unknown {role} SAE", [{"SAE_ID": sae_id}])
        return info

    def _pair(self, caller: SaeInfo, other_id: str, other_role: str) -> SaeInfo:
        other = self._known_sae(other_id, other_role)
        if other.sae_id == caller.sae_id:
            raise InvalidRequest(f"{other_role} SAE must differ from the calling SAE", [{"SAE_ID": other_id}])
        return other

    # -- Get status ----------------------------------------------------------------------------
    def status(self, master: SaeInfo, slave_sae_id: str) -> StatusView:
        slave = self._pair(master, slave_sae_id, "slave")
        policy = self.policies.for_pair(master.sae_id, slave.sae_id)
        if slave.kme_id != self.kme_id and self.remote is not None:
            stored = self.remote.available_keys(slave.kme_id, self.cfg.key_size)
        else:
            with self.db.read() as conn:
                stored = pool.count_available_keys(conn, slave.kme_id, self.cfg.key_size)
        return StatusView(
            source_kme_id=self.kme_id,
            target_kme_id=slave.kme_id,
            master_sae_id=master.sae_id,
            slave_sae_id=slave.sae_id,
            key_size=self.cfg.key_size,
            stored_key_count=stored,
            max_key_count=self.cfg.max_pool_bits // self.cfg.key_size,
            max_key_per_request=self.cfg.max_key_per_request,
            max_key_size=self.cfg.max_key_size,
            min_key_size=self.cfg.min_key_size,
            max_sae_id_count=self.cfg.max_sae_id_count,
            extension={
                "qkms_policy": policy.mode.value,
                "qkms_pqc_fallback": policy.pqc_fallback,
                "qkms_kem": policy.kem if (policy.mode is Mode.HYBRID or policy.pqc_fallback) else None,
                "qkms_reserved_ttl_seconds": self.cfg.reserved_ttl_seconds,
            },
        )

    # -- Get key (master) ----------------------------------------------------------------------
    def get_keys(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
    ) -> list[DeliveredKey]:
        """Get key, in a transaction of its own (the API batches :meth:`get_keys_unit` instead)."""
        request = self._key_request(
            master, slave_sae_id, number, size, additional_slave_sae_ids, extension_mandatory
        )
        if request.slave.kme_id != self.kme_id:
            if self.remote is None:
                raise ServiceUnavailable(f"the slave's KME {request.slave.kme_id} is not a configured peer")
            return self.remote.get_keys(
                master, request.slave, request.recipients, request.number, request.size, request.policy
            )
        return run_unit(self.db, self._reserve_unit(master, request))

    def get_keys_unit(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
    ) -> Unit[list[DeliveredKey]] | None:
        """Check a Get key request and return its database work as a group-commit unit; None if
        the slave is at another KME (then :meth:`get_keys` goes through the peer network)."""
        request = self._key_request(
            master, slave_sae_id, number, size, additional_slave_sae_ids, extension_mandatory
        )
        if request.slave.kme_id != self.kme_id:
            return None
        return self._reserve_unit(master, request)

    def _key_request(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None,
        size: int | None,
        additional_slave_sae_ids: Sequence[str],
        extension_mandatory: Sequence[Mapping[str, Any]],
    ) -> _KeyRequest:
        slave = self._pair(master, slave_sae_id, "slave")
        number = 1 if number is None else number
        size = self.cfg.key_size if size is None else size
        self._check_number_and_size(number, size)
        if extension_mandatory:
            names = [name for ext in extension_mandatory for name in ext]
            raise InvalidRequest(errors.MSG_EXT_MANDATORY_UNSUPPORTED, [{"extension_mandatory": names}])
        recipients = [slave.sae_id, *self._additional_slaves(master, slave, additional_slave_sae_ids)]
        policy = self.policies.for_pair(master.sae_id, slave.sae_id)
        return _KeyRequest(slave, recipients, number, size, policy)

    def _reserve_unit(self, master: SaeInfo, request: _KeyRequest) -> Unit[list[DeliveredKey]]:
        return lambda conn: self._reserve(conn, master, request)

    def _reserve(
        self, conn: Connection, master: SaeInfo, request: _KeyRequest
    ) -> tuple[list[DeliveredKey] | AfterCommit[list[DeliveredKey]], list[AuditEntry]]:
        slave, size, policy = request.slave, request.size, request.policy
        events = pool.EventBatch(datetime.now(UTC))
        actor = f"sae:{master.sae_id}"
        cut = self.cut(conn, slave.kme_id, request.number, size, policy, events, actor)
        fallback = cut[0].material is None
        policy_name = POLICY_FALLBACK if fallback else policy.mode.value
        suite = policy.suite(fallback)
        exchange = None
        if suite is not None:
            exchange = self._encapsulate(conn, policy, slave.kme_id, events.at)
        pool.insert_reserved_keys(
            conn,
            self.envelope,
            cut,
            size_bits=size,
            master_sae_id=master.sae_id,
            slave_sae_ids=request.recipients,
            target_kme_id=slave.kme_id,
            ttl=timedelta(seconds=self.cfg.reserved_ttl_seconds),
            policy=policy_name,
            suite=suite,
            kem_exchange_id=exchange.exchange_id if exchange else None,
            at=events.at,
        )
        events.flush(conn)
        result: list[DeliveredKey] | AfterCommit[list[DeliveredKey]]
        if exchange is not None:
            # Deriving a hybrid key per key_ID needs no transaction: done once the batch committed.
            result = AfterCommit(lambda: self.delivered(cut, exchange, suite, master.sae_id, slave, size))
        else:
            result = self.delivered(cut, None, None, master.sae_id, slave, size)
        record: dict[str, Any] = {
            "key_IDs": [c.key_id for c in cut],
            "size": size,
            "slaves": request.recipients,
            "policy": policy_name,
            "suite": suite,
        }
        if exchange:
            record["kem_ciphertext_sha384"] = hashlib.sha384(exchange.ciphertext).hexdigest()
        return result, [(actor, "keys.reserved", f"{master.sae_id}->{slave.sae_id}", record)]

    def cut(
        self,
        conn: Connection,
        target: str,
        number: int,
        size: int,
        policy: PairPolicy,
        events: pool.EventBatch,
        actor: str,
    ) -> list[pool.CutKey]:
        """QKD bits from the pool toward ``target``; PQC-fallback key IDs (no material) if the pool is
        short and the policy allows it; else 503. Used for local slaves and by ``kms.peer``."""
        kwargs: dict[str, Any] = {
            "target_kme_id": target,
            "number": number,
            "size_bits": size,
            "min_key_size": self.cfg.min_key_size,
            "events": events,
            "actor": actor,
        }
        if not policy.pqc_fallback:
            cut = pool.cut_keys(conn, self.envelope, **kwargs)
        else:
            mark = len(events.rows)
            try:
                with savepoint(conn, "qkms_cut"):
                    cut = pool.cut_keys(conn, self.envelope, **kwargs)
                    if cut is None:
                        raise _PoolShort
            except _PoolShort:
                del events.rows[mark:]  # the rolled-back cut's block events
                return pool.fallback_keys(number)
        if cut is None:
            raise ServiceUnavailable(
                f"not enough key material in the pool toward KME {target} for this request; retry later",
                [{"requested_bits": number * size}],
            )
        return cut

    def _encapsulate(
        self, conn: Connection, policy: PairPolicy, target_kme_id: str, at: datetime
    ) -> KemExchange:
        if target_kme_id != self.kme_id:
            raise ServiceUnavailable(f"no ML-KEM public key is known for KME {target_kme_id}")
        info = self.identity.active_public("kem")
        return self.encapsulate_to(
            conn, policy, target_kme_id, info.algorithm, info.version, info.public_key, at
        )

    def encapsulate_to(
        self,
        conn: Connection,
        policy: PairPolicy,
        target_kme_id: str,
        algorithm: str,
        version: int,
        public_key: bytes,
        at: datetime,
    ) -> KemExchange:
        """One ML-KEM encapsulation to ``target_kme_id``'s public key, recorded for the keys it protects."""
        if algorithm != policy.kem:
            raise ServiceUnavailable(
                f"KME {target_kme_id}'s ML-KEM key is {algorithm}, the policy asks for {policy.kem}"
            )
        ciphertext, secret = self.identity.kem.encapsulate(KemAlgorithm(algorithm), public_key)
        exchange_id = pool.insert_kem_exchange(
            conn, algorithm, target_kme_id, version, hashlib.sha384(public_key).hexdigest(), ciphertext, at
        )
        return KemExchange(exchange_id, version, public_key, ciphertext, secret)

    def delivered(
        self,
        cut: Sequence[pool.CutKey],
        exchange: KemExchange | None,
        suite: str | None,
        master_sae_id: str,
        slave: SaeInfo,
        size: int,
    ) -> list[DeliveredKey]:
        """What the master receives: the QKD bits, or the hybrid / fallback keys derived with ML-KEM."""
        if not (exchange and suite):
            return [DeliveredKey(c.key_id, c.material or b"") for c in cut]
        deriver = self.key_deriver(exchange, suite, master_sae_id, slave)
        return [DeliveredKey(c.key_id, _derived(deriver, c.material, c.key_id, size)) for c in cut]

    def key_deriver(
        self,
        exchange: KemExchange,
        suite: str,
        master_sae_id: str,
        slave: SaeInfo,
        master_kme_id: str | None = None,
    ) -> KeyDeriver:
        """How a request's keys are derived: QKD bits and the ML-KEM secret combined (docs/DECISIONS.md D-4),
        or ML-KEM alone; each key binds its own key_ID."""
        shared = HybridContext(
            suite=suite,
            key_id="",
            master_kme_id=master_kme_id or self.kme_id,
            slave_kme_id=slave.kme_id,
            master_sae_id=master_sae_id,
            slave_sae_id=slave.sae_id,
            kem_public_key=exchange.public_key,
            kem_ciphertext=exchange.ciphertext,
        )
        return KeyDeriver(exchange.secret, shared)

    def _check_number_and_size(self, number: int, size: int) -> None:
        if number < 1:
            raise InvalidRequest("number shall be a positive integer", [{"number": number}])
        if number > self.cfg.max_key_per_request:
            raise InvalidRequest(
                f"number exceeds max_key_per_request ({self.cfg.max_key_per_request})", [{"number": number}]
            )
        if size % 8:
            raise InvalidRequest(errors.MSG_SIZE_MULTIPLE_OF_8, [{"size": size}])
        if size < self.cfg.min_key_size or size > self.cfg.max_key_size:
            raise InvalidRequest(
                f"size shall be between min_key_size ({self.cfg.min_key_size}) and "
                f"max_key_size ({self.cfg.max_key_size}) bits; sizes are in bits, not bytes",
                [{"size": size}],
            )

    def _additional_slaves(self, master: SaeInfo, slave: SaeInfo, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        if len(ids) > self.cfg.max_sae_id_count:
            raise InvalidRequest(
                f"additional_slave_SAE_IDs exceeds max_SAE_ID_count ({self.cfg.max_sae_id_count})",
                [{"additional_slave_SAE_IDs": len(ids)}],
            )
        if len(set(ids)) != len(ids) or slave.sae_id in ids or master.sae_id in ids:
            raise InvalidRequest(
                "additional_slave_SAE_IDs must be distinct from each other, the master and the slave"
            )
        out = []
        for sae_id in ids:
            info = self._known_sae(sae_id, "additional slave")
            if info.kme_id != slave.kme_id:
                raise InvalidRequest(
                    "every additional slave must be served by the same KME as the slave",
                    [{"SAE_ID": sae_id}],
                )
            out.append(info.sae_id)
        return out

    # -- Get key with key IDs (slave) ----------------------------------------------------------
    def get_keys_with_ids(
        self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]
    ) -> list[DeliveredKey]:
        """Get key with key IDs, in a transaction of its own (the API batches the unit instead)."""
        unit, normalised = self.get_keys_with_ids_unit(slave, master_sae_id, key_ids)
        try:
            return run_unit(self.db, unit)
        except NotEntitled:
            self.audit_denied(slave, master_sae_id, normalised)
            raise

    def get_keys_with_ids_unit(
        self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]
    ) -> tuple[Unit[list[DeliveredKey]], list[str]]:
        """Check a Get key with key IDs request; its database work as a unit, and the canonical
        key_IDs (for :meth:`audit_denied` if the unit raises NotEntitled)."""
        self._pair(slave, master_sae_id, "master")
        if not key_ids:
            raise InvalidRequest("key_IDs shall name at least one key")
        if len(key_ids) > self.cfg.max_key_per_request:
            raise InvalidRequest(f"at most {self.cfg.max_key_per_request} key_IDs per request")
        normalised = [_canonical_uuid(k) for k in key_ids]
        if len(set(normalised)) != len(normalised):
            raise InvalidRequest("key_IDs contains the same key_ID twice")

        def serve(conn: Connection) -> tuple[list[DeliveredKey], list[AuditEntry]]:
            return self._serve(conn, slave, master_sae_id, normalised, datetime.now(UTC))

        if self.db.is_sqlite:
            prepared = self._prepare_serve(slave, master_sae_id, normalised)
            if prepared is not None:
                return prepared, normalised
        return serve, normalised

    def _prepare_serve(
        self, slave: SaeInfo, master_sae_id: str, key_ids: list[str]
    ) -> Unit[list[DeliveredKey]] | None:
        """SQLite, where one writer at a time is the limit: read, check and decrypt the keys *before*
        taking the write turn, so that the turn only covers one guarded UPDATE — it consumes the keys
        only if every one of them is still reserved for this slave and unexpired. If anything is not
        as expected (an error to report, a multicast key, a key that changed in between), the unit is
        the ordinary one, which re-reads under the turn and decides: errors and races are always
        judged under the write turn."""
        try:
            with self.db.read() as conn:
                stored = pool.load_keys_for_update(conn, key_ids)
                now = datetime.now(UTC)
                if len(stored) != len(key_ids) or any(
                    stored[k].master_sae_id != master_sae_id
                    or stored[k].slave_sae_id != slave.sae_id
                    or len(stored[k].recipients) != 1
                    or _why_unavailable(stored[k], slave.sae_id, now)
                    for k in key_ids
                ):
                    return None
                rows = pool.whole_rows(stored.values())
                if rows is None:  # part of a run: split under the write turn by the ordinary unit
                    return None
                delivered = self._recover_all(conn, stored, key_ids)
        except Exception:  # let the ordinary unit meet (and report) it under the write turn
            return None

        def serve(conn: Connection) -> tuple[list[DeliveredKey], list[AuditEntry]]:
            at = datetime.now(UTC)
            try:
                with savepoint(conn, "qkms_prepared"):
                    if not pool.consume_if_unchanged(conn, rows, slave.sae_id, at, self._redeliver_until(at)):
                        raise _Changed
            except _Changed:
                return self._serve(conn, slave, master_sae_id, key_ids, at)
            return delivered, [_consumed_entry(slave, master_sae_id, key_ids)]

        return serve

    def _serve(
        self, conn: Connection, slave: SaeInfo, master_sae_id: str, key_ids: list[str], now: datetime
    ) -> tuple[list[DeliveredKey], list[AuditEntry]]:
        stored = pool.load_keys_for_update(conn, key_ids)
        missing = [k for k in key_ids if k not in stored or stored[k].master_sae_id != master_sae_id]
        if missing:
            raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, [{"key_ID": k} for k in missing])
        if any(slave.sae_id not in stored[k].recipients for k in key_ids):
            raise NotEntitled("the requesting SAE is not a slave of one or more of the requested keys")
        reasons = {k: _why_unavailable(stored[k], slave.sae_id, now) for k in key_ids}
        gone = [{"key_ID": k, "reason": r} for k, r in reasons.items() if r]
        if gone:
            if self._redeliverable(stored, key_ids, slave.sae_id, now):
                return self._redeliver(conn, stored, slave, master_sae_id, key_ids)
            raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, gone)
        delivered = self._recover_all(conn, stored, key_ids)
        consumed = pool.mark_served(
            conn, (stored[k] for k in key_ids), slave.sae_id, now, self._redeliver_until(now)
        )
        entry: AuditEntry = (
            f"sae:{slave.sae_id}",
            "keys.delivered",
            f"{master_sae_id}->{slave.sae_id}",
            {"key_IDs": key_ids, "consumed": consumed},
        )
        return delivered, [entry]

    # -- redelivery window ----------------------------------------------------------------------
    def _redeliver_until(self, at: datetime) -> datetime | None:
        """Until when keys consumed at ``at`` keep their sealed material for a lost answer."""
        window = self.cfg.redelivery_seconds
        return at + timedelta(seconds=window) if window > 0 else None

    def _redeliverable(
        self, stored: Mapping[str, pool.StoredKey], key_ids: list[str], slave_sae_id: str, now: datetime
    ) -> bool:
        """Whether the request is a retry by a slave whose answer was lost: every key already
        served to *this* SAE less than ``pool.redelivery_seconds`` ago and still held (consumed
        inside its window, or a multicast key still reserved for other slaves). All or nothing:
        a request mixing such keys with others gets today's answer."""
        window = timedelta(seconds=self.cfg.redelivery_seconds)
        if not window:
            return False
        for k in key_ids:
            key = stored[k]
            served = key.recipients.get(slave_sae_id)
            if (
                served is None
                or served + window <= now
                or key.state not in _REDELIVERABLE_STATES
                or key.expires_at <= now
                or (key.material is None and key.policy != POLICY_FALLBACK)
            ):
                return False
        return True

    def _redeliver(
        self,
        conn: Connection,
        stored: Mapping[str, pool.StoredKey],
        slave: SaeInfo,
        master_sae_id: str,
        key_ids: list[str],
    ) -> tuple[list[DeliveredKey], list[AuditEntry]]:
        """The same keys again, identical bytes, changing no key row: audited as its own action."""
        delivered = self._recover_all(conn, stored, key_ids)
        entry: AuditEntry = (
            f"sae:{slave.sae_id}",
            "keys.redelivered",
            f"{master_sae_id}->{slave.sae_id}",
            {"key_IDs": key_ids},
        )
        return delivered, [entry]

    def _recover_all(
        self, conn: Connection, stored: Mapping[str, pool.StoredKey], key_ids: list[str]
    ) -> list[DeliveredKey]:
        """The named keys as the slave receives them: decrypted and, for hybrid or fallback keys,
        re-derived with the request's ML-KEM secret (decapsulated once per exchange)."""
        exchange_ids = [e for e in (stored[k].kem_exchange_id for k in key_ids) if e is not None]
        exchanges = pool.load_exchanges(conn, exchange_ids)
        secrets = {ex_id: self._decapsulated(ex) for ex_id, ex in exchanges.items()}
        derivers: dict[tuple[Any, ...], KeyDeriver] = {}
        return [self._recover(stored[k], secrets, derivers) for k in key_ids]

    def _decapsulated(self, exchange: pool.StoredExchange) -> KemExchange:
        public = self.identity.public_key("kem", exchange.kem_key_version)
        secret = self.identity.decapsulate(exchange.kem_key_version, exchange.ciphertext)
        return KemExchange(0, exchange.kem_key_version, public.public_key, exchange.ciphertext, secret)

    def _recover(
        self,
        key: pool.StoredKey,
        secrets: Mapping[int, KemExchange],
        derivers: dict[tuple[Any, ...], KeyDeriver],
    ) -> DeliveredKey:
        qkd = self.envelope.open(key.material, pool.key_aad(key.key_id)) if key.material is not None else None
        if key.kem_exchange_id is None or key.suite is None:
            assert qkd is not None  # a plain QKD key always has material while deliverable
            return DeliveredKey(key.key_id, qkd)
        # One deriver per request's context (the keys of one request share it).
        shared = (key.kem_exchange_id, key.suite, key.master_sae_id, key.slave_sae_id, key.source_kme_id)
        deriver = derivers.get(shared)
        if deriver is None:
            slave = self.registry.get(key.slave_sae_id) or SaeInfo(key.slave_sae_id, key.target_kme_id, "")
            deriver = derivers[shared] = self.key_deriver(
                secrets[key.kem_exchange_id], key.suite, key.master_sae_id, slave, key.source_kme_id
            )
        return DeliveredKey(key.key_id, _derived(deriver, qkd, key.key_id, key.size_bits))

    def audit_denied(self, slave: SaeInfo, master_sae_id: str, key_ids: list[str]) -> None:
        """Record a refused Get key with key IDs (401): its own transaction, after the refusal."""
        with self.db.write() as conn:
            audit.append(
                conn,
                datetime.now(UTC),
                [
                    (
                        f"sae:{slave.sae_id}",
                        "access.denied",
                        f"{master_sae_id}->{slave.sae_id}",
                        {"key_IDs": key_ids},
                    )
                ],
            )

    # -- housekeeping --------------------------------------------------------------------------
    def expire_reserved(self) -> int:
        now = datetime.now(UTC)
        actor = f"kme:{self.kme_id}/expiry"
        with self.db.write() as conn:
            expired = pool.expire_reserved(conn, now, actor)
            if expired:
                audit.append(conn, now, [(actor, "keys.expired", "pool", {"key_IDs": expired})])
        return len(expired)


@dataclass(frozen=True)
class _KeyRequest:
    """A checked Get key request."""

    slave: SaeInfo
    recipients: list[str]
    number: int
    size: int
    policy: PairPolicy


@dataclass(frozen=True, repr=False)
class KemExchange:
    """One ML-KEM encapsulation: its row, the public key and ciphertext, and the shared secret."""

    exchange_id: int
    key_version: int
    public_key: bytes
    ciphertext: bytes
    secret: bytes


class RemoteDelivery(Protocol):
    """Keys for slaves at other KMEs (``kms.peer``): the domain core only knows this interface."""

    def get_keys(
        self,
        master: SaeInfo,
        slave: SaeInfo,
        recipients: list[str],
        number: int,
        size: int,
        policy: PairPolicy,
    ) -> list[DeliveredKey]: ...

    def available_keys(self, target_kme_id: str, key_size: int) -> int: ...


class _Changed(Exception):
    """Internal: a prepared Get key with key IDs found its keys changed; the ordinary unit decides."""


class _PoolShort(Exception):
    """Internal: unwinds the savepoint when the pool cannot serve and the fallback may."""


def _derived(deriver: KeyDeriver, qkd: bytes | None, key_id: str, size_bits: int) -> bytes:
    """A hybrid key from the QKD bits, or a PQC-fallback key where there are none."""
    return deriver.fallback(key_id, size_bits // 8) if qkd is None else deriver.hybrid(qkd, key_id)


def _canonical_uuid(value: str) -> str:
    key_id = canonical_key_id(value)
    if key_id is None:
        raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, [{"key_ID": str(value)[:64], "reason": "not a UUID"}])
    return key_id


def _consumed_entry(slave: SaeInfo, master_sae_id: str, key_ids: list[str]) -> AuditEntry:
    """The audit entry of single-slave keys served to (and so consumed by) ``slave``."""
    return (
        f"sae:{slave.sae_id}",
        "keys.delivered",
        f"{master_sae_id}->{slave.sae_id}",
        {"key_IDs": key_ids, "consumed": key_ids},
    )


_REDELIVERABLE_STATES = frozenset({KeyState.CONSUMED.value, KeyState.RESERVED.value})


def _why_unavailable(key: pool.StoredKey, slave_sae_id: str, now: datetime) -> str | None:
    if key.state != KeyState.RESERVED.value:
        return f"key is {key.state}"
    if key.material is None and key.policy != POLICY_FALLBACK:
        return "key material is no longer held"
    if key.recipients.get(slave_sae_id) is not None:
        return "already delivered to this SAE"
    if key.expires_at <= now:
        return "key expired before it was fetched"
    return None
