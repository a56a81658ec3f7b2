"""Key delivery as ETSI GS QKD 014 defines it: status, Get key (master), Get key with key IDs (slave).

This is the domain core: it checks requests against the KME's limits and the SAE registry, and runs
each request as one database transaction through the pool repository. It knows nothing of HTTP;
the API layer turns its errors into status codes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.domain import errors
from kms.domain.errors import InvalidRequest, NotEntitled, ServiceUnavailable
from kms.domain.lifecycle import KeyState
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.storage import pool_repository as pool
from kms.storage.database import Database

POLICY_QKD = "qkd"


@dataclass(frozen=True, repr=False)
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
        self, kme_id: str, pool_cfg: PoolSection, db: Database, envelope: Envelope, registry: SaeRegistry
    ):
        self.kme_id = kme_id
        self.cfg = pool_cfg
        self.db = db
        self.envelope = envelope
        self.registry = registry

    # -- lookups -------------------------------------------------------------------------------
    def _known_sae(self, sae_id: str, role: str) -> SaeInfo:
        info = self.registry.get(sae_id)
        if info is None or not info.enabled:
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
            extension={"qkms_policy": POLICY_QKD, "qkms_reserved_ttl_seconds": self.cfg.reserved_ttl_seconds},
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
        slave = self._pair(master, slave_sae_id, "slave")
        number = 1 if number is None else number
        size = self.cfg.key_size if size is None else size
        self._check_number_and_size(number, size)
        if extension_mandatory:
            names = [name for ext in extension_mandatory for name in ext]
            raise InvalidRequest(errors.MSG_EXT_MANDATORY_UNSUPPORTED, [{"extension_mandatory": names}])
        recipients = [slave.sae_id, *self._additional_slaves(master, slave, additional_slave_sae_ids)]
        events = pool.EventBatch(datetime.now(UTC))
        with self.db.write() as conn:
            cut = pool.reserve_keys(
                conn,
                self.envelope,
                target_kme_id=slave.kme_id,
                number=number,
                size_bits=size,
                min_key_size=self.cfg.min_key_size,
                master_sae_id=master.sae_id,
                slave_sae_ids=recipients,
                ttl=timedelta(seconds=self.cfg.reserved_ttl_seconds),
                policy=POLICY_QKD,
                events=events,
            )
            if cut is None:
                raise ServiceUnavailable(
                    "not enough key material in the pool for this request; retry later",
                    [{"requested_bits": number * size}],
                )
            events.flush(conn)
        return [DeliveredKey(c.key_id, c.material) for c in cut]

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
        self._pair(slave, master_sae_id, "master")
        if not key_ids:
            raise InvalidRequest("key_IDs shall name at least one key")
        if len(key_ids) > self.cfg.max_key_per_request:
            raise InvalidRequest(f"at most {self.cfg.max_key_per_request} key_IDs per request")
        normalised = [_canonical_uuid(k) for k in key_ids]
        if len(set(normalised)) != len(normalised):
            raise InvalidRequest("key_IDs contains the same key_ID twice")
        events = pool.EventBatch(datetime.now(UTC))
        with self.db.write() as conn:
            stored = pool.load_keys_for_update(conn, normalised)
            missing = [k for k in normalised if k not in stored or stored[k].master_sae_id != master_sae_id]
            if missing:
                raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, [{"key_ID": k} for k in missing])
            if any(slave.sae_id not in stored[k].recipients for k in normalised):
                raise NotEntitled("the requesting SAE is not a slave of one or more of the requested keys")
            reasons = {k: _why_unavailable(stored[k], slave.sae_id, events.at) for k in normalised}
            gone = [{"key_ID": k, "reason": r} for k, r in reasons.items() if r]
            if gone:
                raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, gone)
            delivered = []
            for k in normalised:
                material = stored[k].material
                assert material is not None  # guaranteed by _why_unavailable
                delivered.append(DeliveredKey(k, self.envelope.open(material, pool.key_aad(k))))
            pool.mark_served(conn, (stored[k] for k in normalised), slave.sae_id, events)
            events.flush(conn)
        return delivered

    # -- housekeeping --------------------------------------------------------------------------
    def expire_reserved(self) -> int:
        with self.db.write() as conn:
            return pool.expire_reserved(conn, datetime.now(UTC), f"kme:{self.kme_id}/expiry")


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise InvalidRequest(
            errors.MSG_KEYS_NOT_FOUND, [{"key_ID": str(value)[:64], "reason": "not a UUID"}]
        ) from None


def _why_unavailable(key: pool.StoredKey, slave_sae_id: str, now: datetime) -> str | None:
    if key.state != KeyState.RESERVED.value or key.material is None:
        return f"key is {key.state}"
    if key.recipients.get(slave_sae_id) is not None:
        return "already delivered to this SAE"
    if key.expires_at <= now:
        return "key expired before it was fetched"
    return None
