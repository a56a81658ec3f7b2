"""``qkms``: set up, run and inspect a key management entity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kms.cli.admin import audit_app, keys_app, link_app
from kms.cli.backup import backup, restore
from kms.cli.doctor import doctor
from kms.cli.kek import kek_app
from kms.cli.operator_accounts import operator_app
from kms.cli.peer import peer_app
from kms.cli.pilot import pilot_app
from kms.cli.pilot_network import network as pilot_network
from kms.cli.sae import expiry_table, sae_app
from kms.cli.sim import sim_app
from kms.cli.top import top
from kms.config import ConfigError, KmsSettings
from kms.storage.file_modes import restrict_umask

app = typer.Typer(
    name="qkms",
    help="QKMS: a quantum-safe key management entity serving ETSI GS QKD 014 keys from QKD links.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(kek_app, name="kek")
app.command("backup")(backup)
app.command("restore")(restore)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]


@app.callback()
def _owner_only_files() -> None:
    """Every qkms command creates its files owner-only (umask 077): configs, databases, keys, anchors
    and whatever the server writes, including the database's -wal and -shm files."""
    restrict_umask()


def _settings(path: Path) -> KmsSettings:
    try:
        return KmsSettings.load(path)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def init(
    directory: Annotated[Path, typer.Option("--dir", help="New working directory to create.")],
    kme_id: Annotated[str, typer.Option("--kme-id", help="This KME's ID, unique in the QKD network.")],
    sae: Annotated[list[str], typer.Option("--sae", help="An SAE served by this KME (repeat for each).")],
    port: Annotated[int, typer.Option(help="HTTPS port the KME will listen on.")] = 8443,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL; default: SQLite file in DIR.")
    ] = None,
    link_source: Annotated[
        str,
        typer.Option(
            "--link-source",
            help="'simulated' (full-physics BB84 link), 'random' (test source) or 'none' (peer links only).",
        ),
    ] = "simulated",
    auditor: Annotated[
        list[str] | None, typer.Option("--auditor", help="A security-team client of the audit API (repeat).")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="Default key policy: 'qkd' or 'hybrid' (QKD + ML-KEM).")
    ] = "qkd",
    pqc_fallback: Annotated[
        bool, typer.Option(help="Serve ML-KEM-derived keys when no QKD key is available.")
    ] = False,
    pkcs11_module: Annotated[
        Path | None,
        typer.Option(help="Keep the KEK wrapped by a PKCS#11 token (HSM): path of its module (.so)."),
    ] = None,
    pkcs11_token: Annotated[str | None, typer.Option(help="Label of the PKCS#11 token.")] = None,
    pkcs11_key_label: Annotated[
        str, typer.Option(help="Label of the token's wrapping key.")
    ] = "qkms-kek-wrap",
) -> None:
    """Create a working directory: config, CA, KME and SAE certificates, KEK (0600) and a migrated database."""
    from kms.crypto.envelope import KekError
    from kms.provision.workdir import InitError, init_workdir

    if link_source not in ("simulated", "random", "none"):
        raise typer.BadParameter("--link-source must be 'simulated', 'random' or 'none'")
    if policy not in ("qkd", "hybrid"):
        raise typer.BadParameter("--policy must be 'qkd' or 'hybrid'")
    if (pkcs11_module is None) != (pkcs11_token is None):
        raise typer.BadParameter("--pkcs11-module and --pkcs11-token go together")
    try:
        result = init_workdir(
            directory,
            kme_id,
            sae,
            port=port,
            database_url=database_url,
            link_source=None if link_source == "none" else link_source,
            auditor_ids=auditor or [],
            policy={"mode": policy, "pqc_fallback": pqc_fallback, "kem": "ML-KEM-768"},
            pkcs11=(
                {"module": str(pkcs11_module), "token_label": pkcs11_token, "key_label": pkcs11_key_label}
                if pkcs11_module
                else None
            ),
        )
    except (InitError, KekError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"Created KME [bold]{kme_id}[/bold] in {directory}")
    console.print(f"  config:  {result.config_path}")
    console.print(f"  CA:      {result.ca_cert}")
    for sae_id, (cert, key) in result.sae_credentials.items():
        console.print(f"  SAE {sae_id}: {cert} / {key}")
    for auditor_id, (cert, key) in result.auditor_credentials.items():
        console.print(f"  auditor {auditor_id}: {cert} / {key}")
    console.print(f"Start it with: qkms serve --config {result.config_path}")


@app.command()
def serve(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="Listen address (default from config: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default from config).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="API processes sharing the database (SQLite file or PostgreSQL); one per core is a good start. More than one needs a fixed --port."
        ),
    ] = 1,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="auto (JSON lines unless stderr is a terminal) | json | console; default from [logging] format."
        ),
    ] = None,
) -> None:
    """Run the KME over HTTPS with client certificates required, until interrupted."""
    from kms.crypto.envelope import KekError
    from kms.runtime.assembly import load_envelope
    from kms.server import serve as run_server

    if log_format is not None:
        if log_format not in ("auto", "json", "console"):
            err_console.print("[red]error:[/red] --log-format must be auto, json or console")
            raise typer.Exit(2)
        # Through the environment, so the --workers processes (which load the config) log alike.
        os.environ["QKMS_LOGGING__FORMAT"] = log_format
    settings = _settings(config)
    try:
        load_envelope(settings)  # fail here, readably, rather than inside the server's start-up
    except KekError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    from kms.siem.build import SiemConfigError, build_sinks

    try:
        build_sinks(settings)  # [siem]: an unknown receiver host or an unusable CA, in one line
    except SiemConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    run_server(config, host=host, port=port, workers=workers)


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt, revision: Annotated[str, typer.Option(help="Target revision.")] = "head"
) -> None:
    """Migrate the KME's database to the newest schema (or to --revision)."""
    from kms.storage import migrate

    settings = _settings(config)
    migrate.upgrade(settings.database.url, revision)
    console.print(f"database at revision {migrate.current_revision(settings.database.url)}")


@db_app.command("check")
def db_check(
    config: ConfigOpt,
    sample: Annotated[
        int | None,
        typer.Option(help="Open only a random sample of this many sealed rows (default: every one)."),
    ] = None,
    no_kek: Annotated[bool, typer.Option("--no-kek", help="Skip the checks that need the KEK.")] = False,
) -> None:
    """Verify the key store's invariants (docs/SECURITY.md, "Key store invariants"): no bit served
    twice, runs and material lengths consistent, every deliverable key opens with the KEK, closed
    keys zeroised, every consumption audited. Exit status 1 if any is broken (run it after a
    restore, a migration, a crash, or as a control)."""
    from rich.table import Table

    from kms.runtime.assembly import load_envelope
    from kms.storage.database import Database
    from kms.storage.integrity import run_checks

    settings = _settings(config)
    envelope = None if no_kek else load_envelope(settings)
    db = Database(settings.database.url, pool_size=1)
    try:
        with db.read() as conn:
            checks = run_checks(conn, envelope, sample=sample, kme_id=settings.kme.id)
    finally:
        db.dispose()
    table = Table(title="key store integrity")
    for column in ("check", "result", "violations", "examples"):
        table.add_column(column)
    for c in checks:
        mark = "[green]ok[/green]" if c.passed else "[red]BROKEN[/red]"
        table.add_row(c.explanation, mark, str(c.violations), ", ".join(c.examples))
    console.print(table)
    if not all(c.passed for c in checks):
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOpt) -> None:
    """Show links, pool levels and key counts straight from the KME's database."""
    from kms.storage.status_queries import pool_report

    settings = _settings(config)
    report = pool_report(settings.database.url)
    links = Table(title=f"KME {settings.kme.id}: links and pool")
    for col in (
        "link",
        "peer KME",
        "adapter",
        "state",
        "active blocks",
        f"keys of {settings.pool.key_size} bits",
        "stored bits",
        "peer's bits (mirror)",
        "unconfirmed pieces",
    ):
        links.add_column(col)
    for link in report.links:
        links.add_row(
            link.link_id,
            link.peer_kme_id,
            link.adapter,
            link.state,
            str(link.active_blocks),
            str(link.stored_bits // settings.pool.key_size),
            str(link.stored_bits),
            str(link.mirror_bits),
            str(link.unconfirmed_blocks),
        )
    console.print(links)
    if settings.peers:
        peers = Table(title="peer KMEs")
        for col in ("KME", "URL", "bundle"):
            peers.add_column(col)
        for peer in settings.peers:
            peers.add_row(peer.kme_id, peer.url or "(not adjacent: relay only)", str(peer.bundle))
        console.print(peers)
    keys = Table(title="keys by lifecycle state")
    keys.add_column("state")
    keys.add_column("count")
    for state, count in sorted(report.keys_by_state.items()):
        keys.add_row(state, str(count))
    console.print(keys)
    console.print(f"registered SAEs: {', '.join(report.saes) or 'none'}")
    certificates, warnings = expiry_table(settings)
    console.print(certificates)
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the demo KME.")] = Path(
        "demo-run"
    ),
    link_source: Annotated[str, typer.Option("--link-source", help="'simulated' or 'random'.")] = "simulated",
) -> None:
    """Run the main job: create a KME, serve it over mTLS, and have a master and a slave SAE share keys."""
    from kms.lab.demo import run_demo

    raise typer.Exit(run_demo(directory, link_source, console))


app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(link_app, name="link")
app.command(help="Report the PQC backends found, their versions and self-tests.")(doctor)
app.add_typer(sim_app, name="sim")
app.add_typer(peer_app, name="peer")
pilot_app.command("network")(pilot_network)
app.add_typer(pilot_app, name="pilot")
app.add_typer(sae_app, name="sae")
app.add_typer(operator_app, name="operator")
app.command("top")(top)
