"""Web console accounts, logins and sessions (DECISIONS.md D-36; docs/OPERATIONS.md "Operator
console"). Every account change, login (success or failure) and refused session is audited.

A password is checked with scrypt (``kms.crypto.passwords``) outside any transaction; an unknown
name is checked against a dummy hash so it costs the same. ``operator.max_failed_logins`` wrong
passwords in a row lock the account for ``operator.lockout_minutes``. A session is a random token
in a cookie; the database keeps only its SHA-256, the CSRF token, and when it ends (``session_hours``
after login, or ``session_idle_minutes`` unused), so every process of the KME knows it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError

from kms.config import OperatorSection
from kms.crypto.passwords import DUMMY_HASH, hash_password, verify_password
from kms.service import audit_recorder
from kms.storage import console_repository as repo
from kms.storage.console_repository import Account
from kms.storage.database import Database

ROLES = ("operator", "auditor")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOUCH_SECONDS = 15.0  # last_seen_at is rewritten at most this often per session


class AccountError(ValueError):
    """A bad account request (``qkms operator``); the message is one line for the operator."""


class LoginRefused(Exception):
    """Wrong name or password, or a locked account; the message is what the login page says."""


class SessionStale(Exception):
    """A session cookie that names no live session (expired, idle, signed out, or made up)."""


@dataclass(frozen=True)
class Viewer:
    """Who is signed in, for one request."""

    account: str
    role: str
    csrf: str

    @property
    def actor(self) -> str:
        return f"console:{self.account}"


@dataclass(frozen=True)
class SignedIn:
    token: str  # the cookie's value; only its hash is stored
    viewer: Viewer


def session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _printable(name: str) -> str:
    """A name as an audit record may hold it (what a stranger typed, bounded)."""
    return "".join(c if c.isprintable() else "?" for c in name[:64]) or "?"


class ConsoleAuth:
    def __init__(self, db: Database, section: OperatorSection) -> None:
        self.db = db
        self.section = section

    # Accounts (qkms operator add | list | remove)

    def add(self, name: str, role: str, password: str, by: str = "cli") -> None:
        if not NAME.match(name):
            raise AccountError(
                "an account name is 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}")
        hashed = hash_password(password)  # PasswordRejected (a ValueError) for a weak one
        try:
            with self.db.write() as conn:
                if repo.get_account(conn, name) is not None:
                    raise AccountError(f"account {name} exists")
                now = datetime.now(UTC)
                repo.add_account(conn, name, role, hashed, now)
                audit_recorder.record(conn, by, "console.account_added", name, {"role": role}, now)
        except IntegrityError as exc:
            raise AccountError(f"account {name} exists") from exc

    def remove(self, name: str, by: str = "cli") -> None:
        with self.db.write() as conn:
            if not repo.remove_account(conn, name):
                raise AccountError(f"no account {name}")
            audit_recorder.record(conn, by, "console.account_removed", name, {})

    def accounts(self) -> list[Account]:
        with self.db.read() as conn:
            return repo.list_accounts(conn)

    # Login and sessions

    def login(self, name: str, password: str) -> SignedIn:
        """A new session, or ``LoginRefused`` (audited either way)."""
        now = datetime.now(UTC)
        with self.db.read() as conn:
            account = repo.get_account(conn, name) if NAME.match(name) else None
        if account is not None and account.locked_until is not None and account.locked_until > now:
            self._login_failed(name, "locked", None)
            raise LoginRefused("this account is locked after repeated failed logins; try again later")
        matches = verify_password(password, account.password_hash if account else DUMMY_HASH)
        if account is None or not matches:
            locked = self._login_failed(name, "wrong name or password", account)
            if locked:
                raise LoginRefused("wrong name or password; the account is now locked for a while")
            raise LoginRefused("wrong name or password")
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.db.write() as conn:
            repo.clear_failures(conn, name)
            repo.end_sessions_expired(conn, now, now - self._idle)
            repo.add_session(conn, session_id(token), name, csrf, now, now + self._lifetime)
            audit_recorder.record(conn, f"console:{name}", "console.login", name, {"outcome": "ok"}, now)
        return SignedIn(token, Viewer(name, account.role, csrf))

    def _login_failed(self, name: str, reason: str, account: Account | None) -> bool:
        """Count a failure against a known account (locking it at the limit); audit it. Whether
        this failure locked the account."""
        now = datetime.now(UTC)
        locked = account is not None and account.failed_logins + 1 >= self.section.max_failed_logins
        with self.db.write() as conn:
            if account is not None and reason != "locked":
                until = now + timedelta(minutes=self.section.lockout_minutes) if locked else None
                repo.record_failure(conn, account.name, until)
            data = {"outcome": "refused", "reason": reason, **({"locked": True} if locked else {})}
            audit_recorder.record(conn, "console:?", "console.login", _printable(name), data, now)
        return locked and reason != "locked"

    def session(self, token: str) -> Viewer:
        """The signed-in viewer, or ``SessionStale`` (audited: a cookie was presented)."""
        now = datetime.now(UTC)
        sid = session_id(token)
        with self.db.read() as conn:
            found = repo.get_session(conn, sid)
        if found is not None and found.expires_at > now and found.last_seen_at + self._idle > now:
            if (now - found.last_seen_at).total_seconds() > TOUCH_SECONDS:
                with self.db.write() as conn:
                    repo.touch_session(conn, sid, now)
            return Viewer(found.account, found.role, found.csrf_token)
        reason = "session expired" if found is not None else "no such session"
        with self.db.write() as conn:
            if found is not None:
                repo.end_session(conn, sid)
            subject = found.account if found is not None else "?"
            audit_recorder.record(conn, "console:?", "console.refused", subject, {"reason": reason}, now)
        raise SessionStale(reason)

    def logout(self, token: str, viewer: Viewer) -> None:
        with self.db.write() as conn:
            repo.end_session(conn, session_id(token))
            audit_recorder.record(conn, viewer.actor, "console.logout", viewer.account, {})

    def refuse(self, viewer: Viewer | None, action: str, reason: str) -> None:
        """Audit a refused console request (role, CSRF)."""
        actor = viewer.actor if viewer else "console:?"
        subject = viewer.account if viewer else "?"
        audit_recorder.append_alone(
            self.db, [(actor, "console.refused", subject, {"action": action, "reason": reason})]
        )

    @property
    def _idle(self) -> timedelta:
        return timedelta(minutes=self.section.session_idle_minutes)

    @property
    def _lifetime(self) -> timedelta:
        return timedelta(hours=self.section.session_hours)
