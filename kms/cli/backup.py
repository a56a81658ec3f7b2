"""``qkms backup`` and ``qkms restore`` (docs/DECISIONS.md D-28; OPERATIONS.md, "Backup and restore")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kms.config import ConfigError, KmsSettings

console = Console()
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]


def _settings(config: Path) -> KmsSettings:
    try:
        return KmsSettings.load(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def backup(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", help="The backup file to write (must not exist).")],
) -> None:
    """Write a consistent snapshot of the running (or stopped) KME's store, its configuration and its
    KEK references (never a KEK), MAC'd under the active KEK."""
    from kms.cli.admin import _sign_pending
    from kms.crypto.envelope import KekError
    from kms.runtime.assembly import build_runtime
    from kms.service.backup import take_backup
    from kms.storage.snapshot import SnapshotError

    settings = _settings(config)
    try:
        rt = build_runtime(settings, sync_registry=False)
    except KekError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        manifest = take_backup(settings, config, rt.db, rt.envelope, out)
        _sign_pending(rt)
    except (SnapshotError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        rt.close()
    console.print(
        f"backup of KME {manifest['kme_id']} ({manifest['backend']}) written to {out};"
        f" MAC'd under KEK version {manifest['mac_kek_id']}"
    )


def restore(
    file: Annotated[Path, typer.Argument(help="The backup file (from `qkms backup`).")],
    config: ConfigOpt,
) -> None:
    """Restore a backup of this KME into its (stopped) store, after db check and audit verify, and fence
    it: every key and pool bit of the snapshot is marked compromised, so none is ever served twice."""
    from kms.crypto.envelope import KekError
    from kms.service.backup_archive import BackupFileError
    from kms.service.restore import RestoreError
    from kms.service.restore import restore as run_restore
    from kms.storage.snapshot import SnapshotError

    settings = _settings(config)
    try:
        report = run_restore(settings, file)
    except (RestoreError, BackupFileError, KekError, SnapshotError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    f = report.fenced
    console.print(
        f"restored {file.name}: fenced {f.keys} keys ({f.consumed_in_window} inside a redelivery window)"
        f" and {f.blocks} pool blocks ({f.bits} bits) as compromised; snapshot audit head seq {report.snapshot_seq}"
    )
    if report.lost_checkpoints is not None:
        first, last = report.lost_checkpoints
        console.print(
            f"checkpoints #{first}..#{last} anchored after the snapshot are not in the restored history;"
            f" the old anchor file is kept as {report.kept_anchors} (recorded in backup.restored)"
        )
    console.print(f"the replaced store is kept as {report.kept_store}")
    broken = [c.name for c in report.checks if not c.passed]
    console.print(f"db check: {'clean' if not broken else 'BROKEN: ' + ', '.join(broken)};"
                  f" audit verify: {'intact' if report.audit_ok else 'FAILED'}")  # fmt: skip
    for problem in report.problems:
        err.print(f"[red]problem:[/red] {problem}")
    if broken or not report.audit_ok:
        raise typer.Exit(1)
    if not tell_peers_restored(settings):
        raise typer.Exit(3)


def tell_peers_restored(settings: KmsSettings) -> bool:
    """Tell every adjacent peer KME that this one was restored (signed ``store.restored``, DECISIONS.md
    D-39): each retires its pieces of the blocks shared with this KME. Audited here as
    ``backup.peers_told``. False if some peer could not be told (``qkms peer tell-restored`` again)."""
    from kms.cli.admin import _sign_pending
    from kms.peer.restore_notices import tell
    from kms.runtime.assembly import build_runtime
    from kms.service import peer_restored
    from kms.service.peer_sae_states import adopt_after_restore

    if not any(p.url for p in settings.peers):
        return True
    rt = build_runtime(settings, sync_registry=False)
    try:
        assert rt.network is not None
        try:
            notice = peer_restored.notice_of(rt.db, settings.kme.id)
        except peer_restored.NotRestored as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
        outcomes = tell(rt.network.client, rt.network.directory, notice)
        peer_restored.record_told(rt.db, settings.kme.id, notice, outcomes)
        reports = {k: list(o.get("sae_states", [])) for k, o in outcomes.items() if o["told"]}
        for line in adopt_after_restore(rt.db, settings.kme.id, reports):
            console.print(line)
        _sign_pending(rt)
    finally:
        rt.close()
    missed = []
    for kme_id, o in outcomes.items():
        if not o["told"]:
            missed.append(kme_id)
            err.print(f"[yellow]KME {kme_id} not told of the restore:[/yellow] {o['error']}")
            continue
        pieces = sum(v["own_pieces"] + v["mirrored_pieces"] for v in o["links"].values())
        console.print(
            f"KME {kme_id} told of the restore: {pieces} shared pieces retired there,"
            f" {o['keys_kept']} keys made here still deliverable there"
        )
    if missed:
        err.print(f"run `qkms peer tell-restored` once {', '.join(missed)} can be reached")
    return not missed
