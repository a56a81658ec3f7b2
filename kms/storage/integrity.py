"""Invariants of the key store that no database constraint expresses, checked on demand.

``qkms db check`` runs these for operators and auditors: after a restore from backup, after a
migration, after a crash, or as a periodic control; the integration and model-based tests run them
after every test that serves keys. Each check counts the rows (or keys) that break one promise of
docs/SECURITY.md "Key store invariants"; a clean store answers with zeros. Most checks are SQL that
never reads key material; the KEK check opens sealed material (never returning or printing it) to
prove every deliverable key can still be delivered.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, text

from kms.crypto.envelope import Envelope, MaterialIntegrityError, sealed_length
from kms.domain.key_ids import RUN_MAX, run_member
from kms.storage.kek_repository import SEALED_TABLES
from kms.storage.pool_repository import block_aad, consumed_material_overdue, key_aad


@dataclass(frozen=True)
class IntegrityCheck:
    name: str
    explanation: str
    violations: int
    examples: tuple[str, ...]  # key_IDs (or block ids) of the first few offending rows

    @property
    def passed(self) -> bool:
        return self.violations == 0


# (name, explanation, SQL yielding one identifying text column per violating row). Parameter:
# :seal (the sealing overhead in bytes).
_SQL_CHECKS: tuple[tuple[str, str, str], ...] = (
    (
        "key block exists",
        "every key cut from the pool names a key block that exists",
        "SELECT k.key_id FROM keys k LEFT JOIN key_blocks b ON b.id = k.block_id"
        " WHERE k.block_id IS NOT NULL AND b.id IS NULL",
    ),
    (
        "key inside its block",
        "every key's bits lie within its block",
        "SELECT k.key_id FROM keys k JOIN key_blocks b ON b.id = k.block_id"
        " WHERE k.bit_offset IS NULL OR k.bit_offset < 0"
        " OR k.bit_offset + k.size_bits * k.key_count > b.bit_length",
    ),
    (
        "no bit served twice",
        "no two keys share a bit of a block",
        "SELECT key_id FROM (SELECT key_id, bit_offset, MAX(bit_offset + size_bits * key_count) OVER ("
        "PARTITION BY block_id ORDER BY bit_offset, key_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING"
        ") AS covered FROM keys WHERE block_id IS NOT NULL) s WHERE covered > bit_offset",
    ),
    (
        "key runs well formed",
        "a row holding several keys (a run) names its first key_ID",
        f"SELECT key_id FROM keys WHERE key_count < 1 OR key_count > {RUN_MAX}"
        " OR (key_count > 1 AND substr(key_id, 16, 3) <> '000')",
    ),
    (
        "material length",
        "every row's sealed material is key_count keys of size_bits, each sealed on its own",
        "SELECT key_id FROM keys WHERE material IS NOT NULL"
        " AND length(material) <> key_count * (size_bits / 8 + :seal)",
    ),
    (
        "closed keys zeroised",
        "expired and destroyed keys hold no material; consumed keys only inside their redelivery window",
        # (consumed keys past their window: pool.consumed_material_overdue, added in run_checks)
        "SELECT key_id FROM keys WHERE material IS NOT NULL AND state IN ('expired', 'destroyed')",
    ),
    (
        "exhausted blocks zeroised",
        "a block that is fully cut, or destroyed, holds no material",
        "SELECT CAST(id AS VARCHAR(20)) FROM key_blocks WHERE material IS NOT NULL"
        " AND state IN ('exhausted', 'destroyed')",
    ),
)

_EXAMPLES = 5


def run_checks(
    conn: Connection,
    envelope: Envelope | None = None,
    *,
    sample: int | None = None,
    now: datetime | None = None,
    kme_id: str | None = None,
) -> list[IntegrityCheck]:
    """Every check, in a fixed order, with its violation count and a few examples.

    With ``envelope`` (the KEK), the sealed material of every reserved or suspended key and every
    live block is opened (or a random ``sample`` of that many rows of each, for a quick control).
    ``kme_id`` (this KME's) tells keys settled by a peer KME from keys served here; without it every
    consumed key must have been served here.
    """
    params = {"seal": sealed_length(0)}
    extra = {"closed keys zeroised": consumed_material_overdue(conn, now or datetime.now(UTC))}
    out = []
    for name, explanation, sql in _SQL_CHECKS:
        # One pass over the table per check: the window counts every violation before LIMIT.
        rows = conn.execute(
            text(f"SELECT v.*, COUNT(*) OVER () FROM ({sql}) v ORDER BY 1 LIMIT {_EXAMPLES}"), params
        ).all()
        count = int(rows[0][-1]) if rows else 0
        more = extra.get(name, [])
        examples = [str(r[0]) for r in rows] + more
        out.append(IntegrityCheck(name, explanation, count + len(more), tuple(examples[:_EXAMPLES])))
    out.append(
        _found(
            "run IDs consistent", "no key row holds a key_ID that a run row also holds", _run_overlaps(conn)
        )
    )
    outside, examples = _outside_keyring(conn)
    out.append(
        IntegrityCheck(
            "sealed under a live KEK version",
            "every row holding sealed material names a KEK version the keyring holds and has not retired",
            outside,
            tuple(examples[:_EXAMPLES]),
        )
    )
    out.append(
        _found(
            "consumption recorded",
            "every consumed key is named by the audit record of its delivery (or its peer settlement)",
            _unrecorded_consumption(conn, kme_id),
        )
    )
    if envelope is not None:
        out.append(
            _found(
                "material opens with the KEK",
                "every deliverable key's and live block's sealed material authenticates under the KEK"
                " version its row names" + (f" (sample of {sample} rows each)" if sample is not None else ""),
                _unopenable(conn, envelope, sample),
            )
        )
    return out


def _found(name: str, explanation: str, offenders: list[str]) -> IntegrityCheck:
    return IntegrityCheck(name, explanation, len(offenders), tuple(offenders[:_EXAMPLES]))


def _run_overlaps(conn: Connection) -> list[str]:
    """Key rows whose key_ID is also a member of a run row (a key reachable through two rows)."""
    runs = conn.execute(text("SELECT key_id, key_count FROM keys WHERE key_count > 1")).all()
    members = [run_member(base, i) for base, n in runs for i in range(1, min(int(n), RUN_MAX))]
    found: list[str] = []
    for start in range(0, len(members), 500):
        chunk = members[start : start + 500]
        names = {f"m{i}": m for i, m in enumerate(chunk)}
        found += [
            str(r[0])
            for r in conn.execute(text(f"SELECT key_id FROM keys WHERE key_id IN ({_params(names)})"), names)
        ]
    return found


def _unrecorded_consumption(conn: Connection, kme_id: str | None) -> list[str]:
    """Consumed keys that no audit record accounts for.

    A key served to local slaves is consumed by the same transaction that appends ``keys.delivered``
    naming it in ``consumed``; a key for a slave at another KME (``target_kme_id`` not ``kme_id``,
    never served here) — cut here, or relayed by this trusted node for another KME — is consumed
    when the next KME recorded it, in the transaction that appends ``keys.reserved`` with that
    KME's receipt."""
    consumed = conn.execute(
        text(
            "SELECT key_id, key_count, served_at IS NULL AND target_kme_id <> :kme"
            " FROM keys WHERE state = 'consumed'"
        ),
        {"kme": kme_id or ""},
    ).all()
    if not consumed:
        return []
    delivered = _audited_ids(conn, "keys.delivered", "consumed")
    remote = kme_id is not None and any(r[2] for r in consumed)
    settled = _audited_ids(conn, "keys.reserved", "key_IDs", receipt=True) if remote else set()
    missing = []
    for row_id, count, by_peer in consumed:
        recorded = settled if kme_id is not None and by_peer else delivered
        ids = [row_id] if count == 1 else [run_member(row_id, i) for i in range(count)]
        missing += [k for k in ids if k not in recorded]
    return missing


def _audited_ids(conn: Connection, action: str, field: str, receipt: bool = False) -> set[str]:
    """The key_IDs in ``field`` of every ``action`` record (with ``receipt``: only records that
    carry a peer KME's receipt)."""
    found: set[str] = set()
    result = conn.execution_options(stream_results=True).execute(
        text("SELECT data FROM audit_records WHERE action = :action"), {"action": action}
    )
    for (data,) in result:
        body = json.loads(data)
        if not receipt or "receipt_nonce" in body:
            found.update(body.get(field) or ())
    return found


def _unopenable(conn: Connection, envelope: Envelope, sample: int | None) -> list[str]:
    """Rows whose sealed material fails authentication under the KEK (never returns material)."""
    bad: list[str] = []
    key_rows = _rows(
        conn,
        "SELECT key_id, key_count, material, kek_id FROM keys WHERE material IS NOT NULL"
        " AND state IN ('reserved', 'suspended', 'pre_active', 'consumed')",
        sample,
    )
    for key_id, count, material, kek_id in key_rows:
        step = len(material) // count
        for i in range(count):
            member = key_id if count == 1 else run_member(key_id, i)
            if not _opens(envelope, bytes(material[i * step : (i + 1) * step]), key_aad(member), kek_id):
                bad.append(member)
    block_rows = _rows(
        conn,
        "SELECT id, link_id, source_block_id, source_offset_bits, next_bit, material, kek_id FROM key_blocks"
        " WHERE material IS NOT NULL AND state IN ('active', 'pre_active', 'suspended')",
        sample,
    )
    for block_id, link_id, source, offset, next_bit, material, kek_id in block_rows:
        if not _opens(envelope, bytes(material), block_aad(link_id, source, offset, next_bit), kek_id):
            bad.append(f"block {block_id}")
    return bad


def _outside_keyring(conn: Connection) -> tuple[int, list[str]]:
    """Sealed rows whose ``kek_id`` is no live version of the keyring (docs/DECISIONS.md D-27); none
    to check while the keyring is still empty (before the KME's first start on migration 0014)."""
    live = {str(r[0]) for r in conn.execute(text("SELECT kek_id FROM kek_versions WHERE state <> 'retired'"))}
    if not conn.execute(text("SELECT COUNT(*) FROM kek_versions")).scalar_one():
        return 0, []
    count, bad = 0, []
    for table, key, column in SEALED_TABLES:
        sql = f"SELECT kek_id, COUNT(*), MIN({key}) FROM {table} WHERE {column} IS NOT NULL GROUP BY kek_id"
        for kek_id, rows, first in conn.execute(text(sql)):
            if kek_id not in live:
                count += int(rows)
                bad.append(f"{table} {first} and {int(rows) - 1} more ({kek_id})")
    return count, bad


def _rows(conn: Connection, sql: str, sample: int | None) -> Iterator[Any]:
    result = conn.execution_options(stream_results=True).execute(text(sql))
    if sample is None:
        yield from result
        return
    # Reservoir sampling: a uniform sample without loading the table.
    reservoir: list[Any] = []
    pick: Callable[[int], int] = random.SystemRandom().randrange
    for seen, row in enumerate(result):
        if seen < sample:
            reservoir.append(row)
        elif (j := pick(seen + 1)) < sample:
            reservoir[j] = row
    yield from reservoir


def _opens(envelope: Envelope, sealed: bytes, aad: bytes, kek_id: str | None = None) -> bool:
    """Whether ``sealed`` opens under the KEK version its row names (``kek_id``)."""
    try:
        envelope.open(sealed, aad, kek_id)
    except MaterialIntegrityError:
        return False
    return True


def _params(names: dict[str, str]) -> str:
    return ", ".join(f":{n}" for n in names)
