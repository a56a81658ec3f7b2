"""``qkms doctor``: what cryptography this installation really has, and whether it works.

Reports the Python, OpenSSL and cryptography versions, each PQC backend found (or why not), every
algorithm's self-test and the optional backend's interoperability proof. Exits non-zero when the
default backend fails, because then the KME must not start.
"""

from __future__ import annotations

import json
import platform
import ssl
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kms.crypto.pqc import available_backends
from kms.crypto.pqc.pyca_backend import openssl_version


def _cryptography_version() -> str:
    import cryptography

    return str(cryptography.__version__)


def doctor_report() -> dict[str, Any]:
    """Everything ``doctor`` shows, as JSON-ready data; ``ok`` is False if the default backend fails."""
    backends = available_backends(refresh=True)
    default_ok = any(b.default and b.available for b in backends)
    return {
        "ok": default_ok,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "openssl": {"cryptography": openssl_version(), "python_ssl": ssl.OPENSSL_VERSION},
        "cryptography": _cryptography_version(),
        "pqc_backends": [b.as_dict() for b in backends],
    }


def _mark(passed: bool | None) -> str:
    if passed is None:
        return "[dim]-[/dim]"
    return "[green]ok[/green]" if passed else "[red]FAIL[/red]"


def _backend_table(backends: list[dict[str, Any]]) -> Table:
    table = Table(title="PQC backends")
    for column in ("backend", "version", "usable", "self-test", "interop"):
        table.add_column(column)
    for b in backends:
        if b["available"]:
            usable = "[green]yes[/green]"
        elif b["default"]:
            usable = "[red]NO[/red]"
        else:
            usable = "[yellow]no[/yellow]"
        table.add_row(
            b["name"] + (" (default)" if b["default"] else ""),
            b["version"] or "-",
            usable,
            _mark(b["self_test_passed"]) if b["self_test"] else _mark(None),
            _mark(b["interop_passed"]) if b["interop"] else _mark(None),
        )
    return table


def _checks_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in ("algorithm", "check", "result", "ms", "detail"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["algorithm"], r["check"], _mark(r["passed"]), f"{r['seconds'] * 1e3:.2f}", r["detail"]
        )
    return table


def render(report: dict[str, Any], console: Console) -> None:
    """Print the report with Rich."""
    console.print(
        f"Python {report['python']['version']} ({report['python']['implementation']}) on {report['platform']}"
    )
    console.print(f"cryptography {report['cryptography']} linked against {report['openssl']['cryptography']}")
    console.print(f"Python ssl module: {report['openssl']['python_ssl']}")
    console.print(_backend_table(report["pqc_backends"]))
    for b in report["pqc_backends"]:
        if b["location"]:
            console.print(f"  {b['name']}: {b['location']}", soft_wrap=True)
        if b["reason"]:
            console.print(f"  {b['name']} not usable: {b['reason']}", soft_wrap=True)
    for b in report["pqc_backends"]:
        if b["self_test"]:
            console.print(_checks_table(f"{b['name']} self-test", b["self_test"]))
        if b["interop"]:
            console.print(
                _checks_table(f"{b['name']} interoperability with the default backend", b["interop"])
            )
    if report["ok"]:
        console.print("[green]The default PQC backend passed its self-test.[/green]")
    else:
        console.print("[red]The default PQC backend FAILED its self-test: the KME must not run.[/red]")


def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check this installation's cryptography: versions, PQC backends, self-tests and interop."""
    report = doctor_report()
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        render(report, Console())
    if not report["ok"]:
        raise typer.Exit(1)


__all__ = ["doctor", "doctor_report", "render"]
