"""Console accounts and sessions (``console_accounts``, ``console_sessions``, migration 0016). SQL
only; the rules (lockout, expiry, who may do what) are ``kms.service.console_auth``'s."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, insert, select, update

from kms.storage.schema import console_accounts as accounts
from kms.storage.schema import console_sessions as sessions


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str
    failed_logins: int
    locked_until: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Session:
    id: str
    account: str
    role: str
    csrf_token: str
    last_seen_at: datetime
    expires_at: datetime


def utc(at: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns: they were stored in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def get_account(conn: Connection, name: str) -> Account | None:
    row = conn.execute(select(accounts).where(accounts.c.name == name)).first()
    if row is None:
        return None
    locked = utc(row.locked_until) if row.locked_until is not None else None
    return Account(row.name, row.role, row.password_hash, row.failed_logins, locked, utc(row.created_at))


def list_accounts(conn: Connection) -> list[Account]:
    names = conn.execute(select(accounts.c.name).order_by(accounts.c.name)).scalars().all()
    return [a for a in (get_account(conn, n) for n in names) if a is not None]


def add_account(conn: Connection, name: str, role: str, password_hash: str, at: datetime) -> None:
    conn.execute(
        insert(accounts).values(
            name=name,
            role=role,
            password_hash=password_hash,
            failed_logins=0,
            locked_until=None,
            created_at=at,
        )
    )


def remove_account(conn: Connection, name: str) -> bool:
    conn.execute(delete(sessions).where(sessions.c.account == name))
    return conn.execute(delete(accounts).where(accounts.c.name == name)).rowcount == 1


def set_password(conn: Connection, name: str, password_hash: str) -> None:
    conn.execute(
        update(accounts)
        .where(accounts.c.name == name)
        .values(password_hash=password_hash, failed_logins=0, locked_until=None)
    )
    conn.execute(delete(sessions).where(sessions.c.account == name))


def record_failure(conn: Connection, name: str, locked_until: datetime | None) -> None:
    values: dict[str, object] = {"failed_logins": accounts.c.failed_logins + 1}
    if locked_until is not None:
        values = {"failed_logins": 0, "locked_until": locked_until}
    conn.execute(update(accounts).where(accounts.c.name == name).values(**values))


def clear_failures(conn: Connection, name: str) -> None:
    conn.execute(update(accounts).where(accounts.c.name == name).values(failed_logins=0, locked_until=None))


def add_session(
    conn: Connection, session_id: str, account: str, csrf: str, at: datetime, expires_at: datetime
) -> None:
    conn.execute(
        insert(sessions).values(
            id=session_id,
            account=account,
            csrf_token=csrf,
            created_at=at,
            last_seen_at=at,
            expires_at=expires_at,
        )
    )


def get_session(conn: Connection, session_id: str) -> Session | None:
    row = conn.execute(
        select(sessions, accounts.c.role)
        .join(accounts, accounts.c.name == sessions.c.account)
        .where(sessions.c.id == session_id)
    ).first()
    if row is None:
        return None
    return Session(row.id, row.account, row.role, row.csrf_token, utc(row.last_seen_at), utc(row.expires_at))


def touch_session(conn: Connection, session_id: str, at: datetime) -> None:
    conn.execute(update(sessions).where(sessions.c.id == session_id).values(last_seen_at=at))


def end_session(conn: Connection, session_id: str) -> None:
    conn.execute(delete(sessions).where(sessions.c.id == session_id))


def end_sessions_expired(conn: Connection, now: datetime, idle_since: datetime) -> int:
    return int(
        conn.execute(
            delete(sessions).where((sessions.c.expires_at < now) | (sessions.c.last_seen_at < idle_since))
        ).rowcount
    )
