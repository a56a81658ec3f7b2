"""Assembles a key's provenance for security teams: where its bits came from and what happened to it.

Metadata only: no query here selects a material column.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, select

from kms.storage import audit_repository as audit
from kms.storage.pool_repository import member_of, rows_to_find, utc
from kms.storage.schema import kem_exchanges, key_blocks, key_recipients, keys, lifecycle_events, links


def _iso(value: Any) -> str | None:
    return utc(value).isoformat() if value is not None else None


def key_provenance(conn: Connection, key_id: str, kme_id: str) -> dict[str, Any] | None:
    key = _find_key(conn, key_id)
    if key is None:
        return None
    recipients = [
        {"SAE_ID": key.slave_sae_id, "served_at": _iso(key.served_at)},
        *_other_recipients(conn, key_id),
    ]
    record: dict[str, Any] = {
        "key_ID": key.key_id,
        "state": key.state,
        "size_bits": key.size_bits,
        "policy": key.policy,
        "suite": key.suite,
        "source_KME_ID": key.source_kme_id or kme_id,
        "target_KME_ID": key.target_kme_id,
        "recorded_by_KME_ID": kme_id,
        # Relayed keys: every hop (KME to KME, over which links); the intermediate KMEs are the
        # trusted nodes that saw the key.
        "route": key.route,
        "trusted_nodes": [hop["to"] for hop in (key.route or [])[:-1]],
        "master_SAE_ID": key.master_sae_id,
        "slave_SAE_ID": key.slave_sae_id,
        "created_at": _iso(key.created_at),
        "expires_at": _iso(key.expires_at),
        "closed_at": _iso(key.closed_at),
        "recipients": recipients,
        "bits": None if key.block_id is None else _bits(conn, key),
        "kem": None if key.kem_exchange_id is None else _kem(conn, key.kem_exchange_id),
    }
    record["transitions"] = _transitions(conn, key, record["recipients"])
    record["audit_seqs"] = [r.seq for r in audit.records_mentioning(conn, key_id)]
    return record


def _find_key(conn: Connection, key_id: str) -> SimpleNamespace | None:
    """The key's row (metadata only), or None when no row holds it; a run member gets its own ID and bits
    and everything else from its run."""
    found = {
        r.key_id: r
        for r in conn.execute(
            select(
                keys.c.key_id,
                keys.c.key_count,
                keys.c.block_id,
                keys.c.bit_offset,
                keys.c.size_bits,
                keys.c.state,
                keys.c.master_sae_id,
                keys.c.slave_sae_id,
                keys.c.target_kme_id,
                keys.c.policy,
                keys.c.suite,
                keys.c.kem_exchange_id,
                keys.c.created_at,
                keys.c.expires_at,
                keys.c.served_at,
                keys.c.closed_at,
                keys.c.source_kme_id,
                keys.c.route,
            ).where(keys.c.key_id.in_(rows_to_find([key_id])))
        )
    }
    where = member_of(key_id, {i: r.key_count for i, r in found.items()})
    if where is None:
        return None
    row_id, index = where
    row = found[row_id]
    # A run member: its own ID and bits; everything else is the run's.
    bit_offset = None if row.bit_offset is None else row.bit_offset + index * row.size_bits
    return SimpleNamespace(**{**row._asdict(), "key_id": key_id, "bit_offset": bit_offset})


def _other_recipients(conn: Connection, key_id: str) -> list[dict[str, Any]]:
    """The additional slave SAEs of a multi-recipient key, by SAE ID, and when each was served."""
    return [
        {"SAE_ID": r.sae_id, "served_at": _iso(r.served_at)}
        for r in conn.execute(
            select(key_recipients.c.sae_id, key_recipients.c.served_at)
            .where(key_recipients.c.key_id == key_id)
            .order_by(key_recipients.c.sae_id)
        )
    ]


def _bits(conn: Connection, key: SimpleNamespace) -> dict[str, Any]:
    """Where a QKD key's bits lie: the link, the source block and the bit range in it."""
    block = conn.execute(
        select(
            key_blocks.c.link_id,
            key_blocks.c.source_block_id,
            key_blocks.c.source_offset_bits,
            key_blocks.c.state,
            key_blocks.c.provenance,
            links.c.adapter,
            links.c.peer_kme_id,
        )
        .select_from(key_blocks.join(links, links.c.id == key_blocks.c.link_id))
        .where(key_blocks.c.id == key.block_id)
    ).one()
    return {
        "link_ID": block.link_id,
        "adapter": block.adapter,
        "peer_KME_ID": block.peer_kme_id,
        "source_block_ID": block.source_block_id,
        "first_bit": block.source_offset_bits + key.bit_offset,
        "bit_length": key.size_bits,
        "block_state": block.state,
        "block_provenance": block.provenance,
    }


def _kem(conn: Connection, kem_exchange_id: int) -> dict[str, Any]:
    """The KEM exchange a hybrid key combined: algorithm, key version and digests (never the secret)."""
    ex = conn.execute(
        select(
            kem_exchanges.c.algorithm,
            kem_exchanges.c.kem_key_version,
            kem_exchanges.c.public_key_sha384,
            kem_exchanges.c.ciphertext,
        ).where(kem_exchanges.c.id == kem_exchange_id)
    ).one()
    return {
        "algorithm": ex.algorithm,
        "kem_key_version": ex.kem_key_version,
        "public_key_sha384": ex.public_key_sha384,
        "ciphertext_sha384": hashlib.sha384(ex.ciphertext).hexdigest(),
    }


def _transitions(conn: Connection, key: Any, recipients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every transition with time and actor: hot-path ones from the key row and its recipients,
    rarer ones (expiry, suspension, resumption) from ``lifecycle_events``."""
    out: list[dict[str, Any]] = [
        {
            "from": "active",
            "to": "reserved",
            "at": _iso(key.created_at),
            "actor": f"sae:{key.master_sae_id}",
            "reason": f"{key.policy} for {key.slave_sae_id}",
        }
    ]
    served = sorted((r for r in recipients if r["served_at"]), key=lambda r: r["served_at"])
    for i, r in enumerate(served):
        last = i == len(served) - 1 and key.state == "consumed"
        out.append(
            {
                "from": "reserved",
                "to": "consumed" if last else "reserved",
                "at": r["served_at"],
                "actor": f"sae:{r['SAE_ID']}",
                "reason": "every slave served" if last else f"served to {r['SAE_ID']}",
            }
        )
    out += [
        {"from": e.from_state, "to": e.to_state, "at": _iso(e.at), "actor": e.actor, "reason": e.reason}
        for e in conn.execute(
            select(
                lifecycle_events.c.from_state,
                lifecycle_events.c.to_state,
                lifecycle_events.c.at,
                lifecycle_events.c.actor,
                lifecycle_events.c.reason,
            )
            .where(lifecycle_events.c.subject_kind == "key", lifecycle_events.c.subject_id == key.key_id)
            .order_by(lifecycle_events.c.id)
        )
    ]
    return sorted(out, key=lambda t: t["at"] or "")
