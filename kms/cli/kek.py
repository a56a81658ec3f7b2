"""``qkms kek``: the key-encryption key's versions, online rotation and retirement (DECISIONS.md D-27).

Run beside the serving KME (any number of ``--workers``, or processes on one PostgreSQL): each batch
of re-sealing is a short transaction of its own, and the serving processes pick the new version up
from the database within ``kek.refresh_seconds``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kms.config import ConfigError, KmsSettings

kek_app = typer.Typer(
    help="The key-encryption key: versions, online rotation, retirement.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]


def _runtime(config: Path) -> Any:
    from kms.crypto.envelope import KekError
    from kms.runtime.assembly import build_runtime

    try:
        return build_runtime(KmsSettings.load(config), sync_registry=False)
    except (ConfigError, KekError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _rotation(rt: Any, batch: int = 256, pause: float = 0.0) -> Any:
    from kms.service.kek_rotation import KekRotation

    return KekRotation(rt.db, rt.envelope, rt.settings.kek.refresh_seconds, batch=batch, pause_seconds=pause)


@kek_app.command("status")
def kek_status(config: ConfigOpt) -> None:
    """List the KEK versions, where each is loaded from (never the key), and how many records each seals."""
    from kms.crypto.kek_sources import describe

    rt = _runtime(config)
    try:
        rows, counts = _rotation(rt).versions()
    finally:
        rt.close()
    table = Table(title="KEK versions")
    for column in ("version", "state", "source", "sealed records", "created"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.kek_id,
            row.state,
            describe(row.reference),
            str(counts.get(row.kek_id, 0)),
            row.created_at.isoformat(timespec="seconds"),
        )
    console.print(table)


@kek_app.command("rotate")
def kek_rotate(
    config: ConfigOpt,
    env_var: Annotated[
        str | None,
        typer.Option(
            "--env-var",
            help="Take the new KEK (base64) from this environment variable instead of"
            " generating it; required when the active KEK comes from one.",
        ),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, max=10000, help="Records re-sealed per transaction.")] = 256,
    pause: Annotated[float, typer.Option(min=0.0, help="Seconds to wait between batches.")] = 0.0,
) -> None:
    """Make a new KEK version and re-seal every sealed record under it while the KME serves; resumes
    an unfinished rotation (after a crash) instead of starting another."""
    from kms.cli.admin import _sign_pending
    from kms.crypto.envelope import KekError
    from kms.service.kek_rotation import KekRotationError

    rt = _runtime(config)
    try:
        rotation = _rotation(rt, batch, pause)
        try:
            with rotation.exclusive():
                target, resumed = rotation.start(env_var)
                verb = "resuming the rotation to" if resumed else "rotating to"
                console.print(f"{verb} KEK version {target}; re-sealing in batches of {batch}")
                report = rotation.reseal(target, resumed)
        except (KekError, KekRotationError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        _sign_pending(rt)
    finally:
        rt.close()
    moved = ", ".join(f"{n} {t}" for t, n in report.resealed.items()) or "nothing left to re-seal"
    console.print(
        f"KEK version {target} seals everything: {moved} in {report.batches} batches, {report.seconds:.1f} s;"
        " retire the old version with `qkms kek retire VERSION`"
    )


@kek_app.command("retire")
def kek_retire(
    version: Annotated[str, typer.Argument(help="The KEK version to retire (see `qkms kek status`).")],
    config: ConfigOpt,
    keep_key: Annotated[
        bool, typer.Option("--keep-key", help="Retire it but leave its file (or wrapped file) in place.")
    ] = False,
) -> None:
    """Retire a KEK version nothing is sealed under any more, and destroy its key file."""
    from kms.cli.admin import _sign_pending
    from kms.crypto.envelope import KekError
    from kms.service.kek_rotation import KekRotationError

    rt = _runtime(config)
    try:
        try:
            with (rotation := _rotation(rt)).exclusive():
                done = rotation.retire(version, destroy=not keep_key)
        except (KekError, KekRotationError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        _sign_pending(rt)
    finally:
        rt.close()
    console.print(f"KEK version {version} retired; {done}")
