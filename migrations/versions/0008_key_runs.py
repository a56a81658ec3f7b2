"""Key runs: one ``keys`` row for the keys a request cut from one block.

``key_count`` > 1 makes the row a run: its ``key_id`` is the run's first ID, member ``i`` has the
same UUIDv7 with ``i`` in its counter bits (``kms.domain.key_ids``), its bits start at
``bit_offset + i * size_bits`` and its sealed material is the ``i``-th equal slice of ``material``.
Existing rows are single keys (``key_count`` 1). Downgrading splits every run into single rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: no table rebuild, the partial indexes stay as they are.
    op.add_column("keys", sa.Column("key_count", sa.Integer(), nullable=False, server_default="1"))


def _member(base: str, index: int) -> str:
    return f"{base[:15]}{index:03x}{base[18:]}"


def downgrade() -> None:
    bind = op.get_bind()
    keys = sa.Table("keys", sa.MetaData(), autoload_with=bind)
    runs = bind.execute(sa.select(keys).where(keys.c.key_count > 1)).mappings().all()
    for run in runs:
        count = run["key_count"]
        material = run["material"]
        step = len(material) // count if material is not None else 0
        members = []
        for i in range(count):
            row = dict(run)
            row.update(
                key_id=_member(run["key_id"], i),
                bit_offset=None if run["bit_offset"] is None else run["bit_offset"] + i * run["size_bits"],
                material=None if material is None else bytes(material[i * step : (i + 1) * step]),
                key_count=1,
            )
            members.append(row)
        bind.execute(sa.delete(keys).where(keys.c.key_id == run["key_id"]))
        bind.execute(sa.insert(keys), members)
    # SQLite >= 3.35 drops a column in place (no rebuild, so the partial indexes survive).
    op.execute("ALTER TABLE keys DROP COLUMN key_count")
