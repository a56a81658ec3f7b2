"""``qkms operator``: accounts of the web console on the operator listener (docs/OPERATIONS.md
"Operator console", DECISIONS.md D-36). Each change is one audited use case of
``kms.service.console_auth``; the running KME sees it at the next request (accounts and sessions
live in the database)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kms.config import ConfigError, KmsSettings

operator_app = typer.Typer(
    help="Web console accounts: add, list, remove operators and auditors.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]
NameArg = Annotated[str, typer.Argument(help="The account name (letters, digits, '.', '_', '-').")]


@contextmanager
def _auth(config: Path) -> Iterator[object]:
    from kms.crypto.passwords import PasswordRejected
    from kms.service.console_auth import AccountError, ConsoleAuth
    from kms.storage.database import Database

    try:
        settings = KmsSettings.load(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    db = Database(settings.database.url)
    try:
        yield ConsoleAuth(db, settings.operator)
    except (AccountError, PasswordRejected) as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    finally:
        db.dispose()


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


@operator_app.command("add")
def add(
    config: ConfigOpt,
    name: NameArg,
    role: Annotated[
        str, typer.Option(help="operator (may suspend and resume links) or auditor (reads only).")
    ],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
) -> None:
    """Add a console account; the password (12 characters or more) is stored as a scrypt hash."""
    from kms.service.console_auth import ConsoleAuth

    password = _password(password_stdin)
    with _auth(config) as auth:
        assert isinstance(auth, ConsoleAuth)
        auth.add(name, role, password)
    console.print(f"console account {name} added ({role})")


@operator_app.command("list")
def list_accounts(config: ConfigOpt) -> None:
    """The console accounts, their roles and lockouts (never their password hashes)."""
    from kms.service.console_auth import ConsoleAuth

    with _auth(config) as auth:
        assert isinstance(auth, ConsoleAuth)
        accounts = auth.accounts()
    table = Table(title="console accounts")
    for col in ("name", "role", "created (UTC)", "failed logins", "locked until (UTC)"):
        table.add_column(col)
    now = datetime.now(UTC)
    for a in accounts:
        locked = a.locked_until.strftime("%Y-%m-%d %H:%M") if a.locked_until and a.locked_until > now else "-"
        table.add_row(a.name, a.role, a.created_at.strftime("%Y-%m-%d %H:%M"), str(a.failed_logins), locked)
    console.print(table)


@operator_app.command("remove")
def remove(config: ConfigOpt, name: NameArg) -> None:
    """Remove a console account; its sessions end at once."""
    from kms.service.console_auth import ConsoleAuth

    with _auth(config) as auth:
        assert isinstance(auth, ConsoleAuth)
        auth.remove(name)
    console.print(f"console account {name} removed")
