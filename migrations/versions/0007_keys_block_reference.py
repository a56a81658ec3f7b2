"""Drop the foreign key from keys.block_id to key_blocks.

PostgreSQL checked it with a trigger per inserted key — about a third of the cost of recording a
128-key request. The reference cannot dangle in practice (key blocks are never deleted, and a key's
block is the row its request locked to cut it); ``qkms db check`` verifies it, together with the
invariants no constraint can express (no two keys share a bit of a block, closed keys hold no
material).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 18:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_keys_block_id_key_blocks"
# SQLite rebuilds the table to change a constraint; these partial indexes are recreated by hand so
# that their WHERE clauses survive the rebuild whatever the reflection of partial indexes does.
PARTIAL = (
    ("ix_keys_reserved_expiry", ["expires_at"], "state = 'reserved'"),
    ("ix_keys_live_block", ["block_id"], "state IN ('reserved', 'suspended')"),
)


def _rebuild(change: str) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        for name, _, _ in PARTIAL:
            op.drop_index(name, table_name="keys")
    with op.batch_alter_table("keys", schema=None) as batch_op:
        if change == "drop":
            batch_op.drop_constraint(FK, type_="foreignkey")
        else:
            batch_op.create_foreign_key(FK, "key_blocks", ["block_id"], ["id"])
    if sqlite:
        for name, columns, where in PARTIAL:
            op.create_index(name, "keys", columns, sqlite_where=sa.text(where))


def upgrade() -> None:
    _rebuild("drop")


def downgrade() -> None:
    _rebuild("create")
