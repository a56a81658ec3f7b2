"""Web console accounts and sessions (DECISIONS.md D-36).

``console_accounts``: operators and auditors of the console on the operator listener, each with a
scrypt password hash and a lockout counter. ``console_sessions``: signed-in sessions kept server
side (the SHA-256 of the cookie's token, the CSRF token, expiry), so every process of the KME knows
them. Downgrading drops both: everyone signs in again after accounts are re-created.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 21:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_accounts",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_console_accounts")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account"], ["console_accounts.name"], name=op.f("fk_console_sessions_account_console_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
    )
    op.create_index(op.f("ix_console_sessions_account"), "console_sessions", ["account"])


def downgrade() -> None:
    op.drop_index(op.f("ix_console_sessions_account"), table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("console_accounts")
