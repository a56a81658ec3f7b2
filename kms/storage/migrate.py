"""Schema migrations with Alembic, driven from code (``qkms db upgrade`` and ``qkms init``).

The migration scripts live in the repository's top-level ``migrations/`` folder;
``QKMS_MIGRATIONS_DIR`` points elsewhere (the container image sets it).
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from kms.storage.database import secure_sqlite_files


def migrations_dir() -> Path:
    override = os.environ.get("QKMS_MIGRATIONS_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise FileNotFoundError(f"Alembic migrations not found in {path}; set QKMS_MIGRATIONS_DIR")
    return path


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    secure_sqlite_files(url)  # a SQLite file it creates is owner-only, like the server's
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Step the database at ``url`` back to ``revision`` (an operator's rollback of an upgrade)."""
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
