"""Key delivery rules as ETSI GS QKD 014 defines them: what Get status, Get key and Get key with key
IDs may ask, which stored keys may be served to whom, and the Status document.

Pure: no database, no HTTP, no crypto backend. The application services (``kms.service``) apply these
rules inside their units of work; the API layer turns the errors into status codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kms.config import PoolSection
from kms.domain import errors
from kms.domain.errors import InvalidRequest
from kms.domain.key_ids import canonical_key_id
from kms.domain.keys import StoredKey
from kms.domain.lifecycle import KeyState
from kms.domain.policy import POLICY_FALLBACK, Mode, PairPolicy, PolicyBook
from kms.domain.saes import SaeInfo, SaeRegistry


# Not frozen: made per key on the delivery hot path, where a frozen dataclass's __init__ cost
# ~8x a slotted one's (1.6 against 0.2 us for a StoredKey). Treat instances as read-only.
@dataclass(repr=False, slots=True)
class DeliveredKey:
    """A key on its way to an SAE. The repr never shows the material."""

    key_id: str
    material: bytes

    def __repr__(self) -> str:
        return f"DeliveredKey(key_id={self.key_id!r}, bits={len(self.material) * 8})"


@dataclass(frozen=True, repr=False)
class KemExchange:
    """One ML-KEM encapsulation: its row, the public key and ciphertext, and the shared secret."""

    exchange_id: int
    key_version: int
    public_key: bytes
    ciphertext: bytes
    secret: bytes


@dataclass(frozen=True)
class KeyOrder:
    """A checked Get key request: who asks, for which slaves, how many keys of which size, under
    which pair policy. (The ETSI wire format is ``kms.api.schemas.KeyRequest``.)"""

    master: SaeInfo
    slave: SaeInfo
    recipients: list[str]  # the slave first, then any additional slaves
    number: int
    size: int
    policy: PairPolicy


# The one definition of the Status document: the service builds it, the API serialises it and
# publishes its schema (the docstring below is the published description).
@dataclass(frozen=True)
class Status:
    """Get status: the KME's limits for the master/slave pair and how many keys it can serve
    (ETSI GS QKD 014 Status data format; field names as the standard spells them)."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int
    status_extension: dict[str, Any] | None = None


# -- who may ask ---------------------------------------------------------------------------------
def known_sae(registry: SaeRegistry, sae_id: str, role: str) -> SaeInfo:
    """A registered, enabled SAE (not an auditor); else 400 naming ``role``."""
    info = registry.get(sae_id)
    if info is None or not info.enabled or info.role != "sae":
        raise InvalidRequest(f"unknown {role} SAE", [{"SAE_ID": sae_id}])
    return info


def counterpart(registry: SaeRegistry, caller: SaeInfo, other_id: str, other_role: str) -> SaeInfo:
    """The other SAE of the pair: known, and not the caller itself."""
    other = known_sae(registry, other_id, other_role)
    if other.sae_id == caller.sae_id:
        raise InvalidRequest(f"{other_role} SAE must differ from the calling SAE", [{"SAE_ID": other_id}])
    return other


# -- Get status ------------------------------------------------------------------------------------
def status_document(
    kme_id: str, cfg: PoolSection, master: SaeInfo, slave: SaeInfo, policy: PairPolicy, stored: int
) -> Status:
    """What Get status reports for the pair: the KME's limits, ``stored`` keys of the default size,
    and the pair's policy as a QKMS status extension."""
    return Status(
        source_KME_ID=kme_id,
        target_KME_ID=slave.kme_id,
        master_SAE_ID=master.sae_id,
        slave_SAE_ID=slave.sae_id,
        key_size=cfg.key_size,
        stored_key_count=stored,
        max_key_count=cfg.max_pool_bits // cfg.key_size,
        max_key_per_request=cfg.max_key_per_request,
        max_key_size=cfg.max_key_size,
        min_key_size=cfg.min_key_size,
        max_SAE_ID_count=cfg.max_sae_id_count,
        status_extension={
            "qkms_policy": policy.mode.value,
            "qkms_pqc_fallback": policy.pqc_fallback,
            "qkms_kem": policy.kem if (policy.mode is Mode.HYBRID or policy.pqc_fallback) else None,
            "qkms_reserved_ttl_seconds": cfg.reserved_ttl_seconds,
        },
    )


# -- Get key ---------------------------------------------------------------------------------------
def key_order(
    cfg: PoolSection,
    registry: SaeRegistry,
    policies: PolicyBook,
    master: SaeInfo,
    slave_sae_id: str,
    number: int | None,
    size: int | None,
    additional_slave_sae_ids: Sequence[str],
    extension_mandatory: Sequence[Mapping[str, Any]],
) -> KeyOrder:
    """Check a Get key request against the KME's limits, the registry and the pair's policy."""
    slave = counterpart(registry, master, slave_sae_id, "slave")
    number = 1 if number is None else number
    size = cfg.key_size if size is None else size
    check_number_and_size(cfg, number, size)
    if extension_mandatory:
        names = [name for ext in extension_mandatory for name in ext]
        raise InvalidRequest(errors.MSG_EXT_MANDATORY_UNSUPPORTED, [{"extension_mandatory": names}])
    recipients = [slave.sae_id, *additional_slaves(cfg, registry, master, slave, additional_slave_sae_ids)]
    policy = policies.for_pair(master.sae_id, slave.sae_id)
    return KeyOrder(master, slave, recipients, number, size, policy)


def check_number_and_size(cfg: PoolSection, number: int, size: int) -> None:
    if number < 1:
        raise InvalidRequest("number shall be a positive integer", [{"number": number}])
    if number > cfg.max_key_per_request:
        raise InvalidRequest(
            f"number exceeds max_key_per_request ({cfg.max_key_per_request})", [{"number": number}]
        )
    if size % 8:
        raise InvalidRequest(errors.MSG_SIZE_MULTIPLE_OF_8, [{"size": size}])
    if size < cfg.min_key_size or size > cfg.max_key_size:
        raise InvalidRequest(
            f"size shall be between min_key_size ({cfg.min_key_size}) and "
            f"max_key_size ({cfg.max_key_size}) bits; sizes are in bits, not bytes",
            [{"size": size}],
        )


def additional_slaves(
    cfg: PoolSection, registry: SaeRegistry, master: SaeInfo, slave: SaeInfo, ids: Sequence[str]
) -> list[str]:
    """Multicast: distinct known SAEs, served by the slave's KME, at most ``max_sae_id_count``."""
    if not ids:
        return []
    if len(ids) > cfg.max_sae_id_count:
        raise InvalidRequest(
            f"additional_slave_SAE_IDs exceeds max_SAE_ID_count ({cfg.max_sae_id_count})",
            [{"additional_slave_SAE_IDs": len(ids)}],
        )
    if len(set(ids)) != len(ids) or slave.sae_id in ids or master.sae_id in ids:
        raise InvalidRequest(
            "additional_slave_SAE_IDs must be distinct from each other, the master and the slave"
        )
    out = []
    for sae_id in ids:
        info = known_sae(registry, sae_id, "additional slave")
        if info.kme_id != slave.kme_id:
            raise InvalidRequest(
                "every additional slave must be served by the same KME as the slave",
                [{"SAE_ID": sae_id}],
            )
        out.append(info.sae_id)
    return out


# -- Get key with key IDs ------------------------------------------------------------------------
def checked_key_ids(cfg: PoolSection, key_ids: Sequence[str]) -> list[str]:
    """The requested key_IDs in canonical form: at least one, at most ``max_key_per_request``,
    each a UUID, none twice."""
    if not key_ids:
        raise InvalidRequest("key_IDs shall name at least one key")
    if len(key_ids) > cfg.max_key_per_request:
        raise InvalidRequest(f"at most {cfg.max_key_per_request} key_IDs per request")
    normalised = [_canonical_uuid(k) for k in key_ids]
    if len(set(normalised)) != len(normalised):
        raise InvalidRequest("key_IDs contains the same key_ID twice")
    return normalised


def _canonical_uuid(value: str) -> str:
    key_id = canonical_key_id(value)
    if key_id is None:
        raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, [{"key_ID": str(value)[:64], "reason": "not a UUID"}])
    return key_id


def why_unavailable(key: StoredKey, slave_sae_id: str, now: datetime) -> str | None:
    """Why ``key`` cannot be served to ``slave_sae_id`` now (the ETSI 400 detail), or None."""
    if key.state != KeyState.RESERVED.value:
        return f"key is {key.state}"
    if key.material is None and key.policy != POLICY_FALLBACK:
        return "key material is no longer held"
    if key.recipients.get(slave_sae_id) is not None:
        return "already delivered to this SAE"
    if key.expires_at <= now:
        return "key expired before it was fetched"
    return None


def plainly_servable(
    stored: Mapping[str, StoredKey],
    key_ids: Sequence[str],
    master_sae_id: str,
    slave_sae_id: str,
    now: datetime,
) -> bool:
    """Every key exists, is the pair's, has this slave as its only recipient and may be served: the
    plain case that SQLite serves with one guarded UPDATE (anything else is judged under the turn)."""
    return len(stored) == len(key_ids) and not any(
        stored[k].master_sae_id != master_sae_id
        or stored[k].slave_sae_id != slave_sae_id
        or len(stored[k].recipients) != 1
        or why_unavailable(stored[k], slave_sae_id, now)
        for k in key_ids
    )


# -- the redelivery window (docs/DECISIONS.md D-14) -------------------------------------------------
_REDELIVERABLE_STATES = frozenset({KeyState.CONSUMED.value, KeyState.RESERVED.value})


def redeliver_until(cfg: PoolSection, at: datetime) -> datetime | None:
    """Until when keys consumed at ``at`` keep their sealed material for a lost answer."""
    window = cfg.redelivery_seconds
    return at + timedelta(seconds=window) if window > 0 else None


def redeliverable(
    cfg: PoolSection,
    stored: Mapping[str, StoredKey],
    key_ids: Sequence[str],
    slave_sae_id: str,
    now: datetime,
) -> bool:
    """Whether the request is a retry by a slave whose answer was lost: every key already served to
    *this* SAE less than ``pool.redelivery_seconds`` ago and still held (consumed inside its window,
    or a multicast key still reserved for other slaves). All or nothing: a request mixing such keys
    with others gets today's answer."""
    window = timedelta(seconds=cfg.redelivery_seconds)
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
