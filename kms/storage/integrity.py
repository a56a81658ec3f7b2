"""Invariants of the key store that no database constraint expresses, checked on demand.

``qkms db check`` runs these for operators and auditors: after a restore from backup, after a
migration, or as a periodic control. Each check counts the rows that break it (never reading key
material), so a clean store answers with zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

from kms.domain.lifecycle import KeyState

_CLOSED = tuple(s.value for s in (KeyState.CONSUMED, KeyState.EXPIRED, KeyState.DESTROYED))


@dataclass(frozen=True)
class IntegrityCheck:
    name: str
    explanation: str
    violations: int
    examples: tuple[str, ...]  # key_IDs (or block ids) of the first few offending rows

    @property
    def passed(self) -> bool:
        return self.violations == 0


# (name, explanation, SQL yielding one identifying text column per violating row)
_CHECKS: tuple[tuple[str, str, str], ...] = (
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
        "a row holding several keys (a run) names its first key_ID and splits its material evenly",
        "SELECT key_id FROM keys WHERE key_count < 1 OR key_count > 4096"
        " OR (key_count > 1 AND substr(key_id, 16, 3) <> '000')"
        " OR (material IS NOT NULL AND length(material) % key_count <> 0)",
    ),
    (
        "closed keys zeroised",
        "consumed, expired and destroyed keys hold no material",
        "SELECT key_id FROM keys WHERE material IS NOT NULL AND state IN (:c0, :c1, :c2)",
    ),
)

_EXAMPLES = 5


def run_checks(conn: Connection) -> list[IntegrityCheck]:
    """Every check, in a fixed order, with its violation count and a few examples."""
    params = {f"c{i}": state for i, state in enumerate(_CLOSED)}
    out = []
    for name, explanation, sql in _CHECKS:
        # One pass over the table per check: the window counts every violation before LIMIT.
        rows = conn.execute(
            text(f"SELECT v.*, COUNT(*) OVER () FROM ({sql}) v ORDER BY 1 LIMIT {_EXAMPLES}"), params
        ).all()
        count = int(rows[0][-1]) if rows else 0
        out.append(IntegrityCheck(name, explanation, count, tuple(str(r[0]) for r in rows)))
    return out
