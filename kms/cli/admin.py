"""Operator and security-team commands: ``qkms audit``, ``qkms keys``, ``qkms link``.

They work on the KME's database through the same services as the server (the same KEK and config),
so they also work while the server is down — for example to verify or export the audit trail after
an incident.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kms.config import ConfigError, KmsSettings

audit_app = typer.Typer(help="Audit trail: provenance, events, verification, export.", no_args_is_help=True)
keys_app = typer.Typer(
    help="The KME's post-quantum identity keys (ML-DSA-65, ML-KEM-768).", no_args_is_help=True
)
link_app = typer.Typer(help="Link health: suspend or resume a link's keys.", no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]


def _runtime(config: Path):  # type: ignore[no-untyped-def]
    from kms.runtime.assembly import build_runtime

    try:
        settings = KmsSettings.load(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    return build_runtime(settings, sync_registry=False)


def _audit_service(config: Path):  # type: ignore[no-untyped-def]
    from kms.service.audit_queries import AuditService

    rt = _runtime(config)
    return rt, AuditService.for_settings(rt.db, rt.identity, rt.settings)


def _sign_pending(rt: Any) -> None:
    """Sign and anchor what a CLI command just appended to the audit, so that records written while
    the server is stopped do not sit unsigned past the tail window."""
    from kms.audit.integrity import AuditIntegrityError
    from kms.service.audit_checkpoints import CheckpointWriter

    try:
        CheckpointWriter.for_settings(rt.db, rt.identity, rt.settings).write()
    except AuditIntegrityError as exc:
        err.print(f"[red]warning:[/red] audit not signed, it no longer matches its anchors: {exc}")


@audit_app.command("show")
def audit_show(key_id: Annotated[str, typer.Argument(help="The key_ID (UUID).")], config: ConfigOpt) -> None:
    """Print a key's provenance: its bits' origin, policy and PQC suite, SAEs, lifecycle, audit records."""
    rt, service = _audit_service(config)
    try:
        record = service.provenance(key_id)
    finally:
        rt.close()
    if record is None:
        err.print(f"[red]error:[/red] no key {key_id} on this KME")
        raise typer.Exit(1)
    console.print_json(json.dumps(record))


@audit_app.command("events")
def audit_events(
    config: ConfigOpt,
    since: Annotated[str | None, typer.Option(help="ISO 8601 UTC time, e.g. 2026-11-23T10:00:00")] = None,
    after_seq: Annotated[int, typer.Option(help="Only records after this sequence number.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many records.")] = 100,
) -> None:
    """List audit records in order."""
    if since is not None:
        try:
            since = datetime.fromisoformat(since).astimezone(UTC).isoformat(timespec="microseconds")
        except ValueError as exc:
            raise typer.BadParameter("--since must be an ISO 8601 time") from exc
    rt, service = _audit_service(config)
    try:
        data = service.events(after_seq, since, limit)
    finally:
        rt.close()
    table = Table(title=f"audit records (head seq {data['head']['seq']})")
    for col in ("seq", "at", "actor", "action", "subject", "data"):
        table.add_column(col)
    for r in data["records"]:
        table.add_row(
            str(r["seq"]), r["at"], r["actor"], r["action"], r["subject"], json.dumps(r["data"])[:80]
        )
    console.print(table)


@audit_app.command("verify")
def audit_verify(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Verify the KME's database.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Verify an export offline instead.")] = None,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="The KME's public keys (from `qkms keys export-public`)."),
    ] = None,
    anchors: Annotated[
        Path | None,
        typer.Option(
            "--anchors",
            help="An anchor file (<KME>.anchors.jsonl, or a peer's copy of it from its"
            " peer-copies/ directory) to check against; with --config the KME's own is the default.",
        ),
    ] = None,
) -> None:
    """Check the audit chain, the checkpoint chain and the anchors; name every edited, deleted,
    inserted or reordered record and every missing, altered or forged checkpoint."""
    from kms.audit.anchors import AnchorFile
    from kms.audit.verification import load_public_keys, report_json, verify_export
    from kms.crypto.pqc.registry import get_signature_provider

    # A peer's copy (<anchor dir>/peer-copies/<KME>.anchors.jsonl at the peer) starts wherever the
    # peering started, so any anchor file given may start after checkpoint #1.
    anchor_file = AnchorFile(anchors, from_first=False) if anchors is not None else None
    if anchors is not None and not anchors.is_file():
        raise typer.BadParameter(f"--anchors: no file {anchors}")
    if file is not None:
        if public_key is None:
            raise typer.BadParameter("--file needs --public-key")
        report = verify_export(
            json.loads(file.read_text(encoding="utf-8")),
            load_public_keys(public_key),
            get_signature_provider(),
            anchors=anchor_file,
        )
    elif config is not None:
        rt, service = _audit_service(config)
        try:
            report = service.verify(anchor_file)
            if rt.countersigner is not None:
                from kms.peer.countersign import receipt_report

                countersigned, receipt_problems = receipt_report(rt.countersigner.ctx)
                report.problems.extend(receipt_problems)
                for line in countersigned:
                    console.print(f"countersigned: {line}")
        finally:
            rt.close()
    else:
        raise typer.BadParameter("give --config, or --file with --public-key")
    result = report_json(report)
    for problem in report.problems:
        console.print(f"[red]TAMPERED[/red] {problem}")
    anchored = "no anchor file checked" if report.anchors is None else f"{report.anchors} anchors checked"
    console.print(
        f"{result['records']} records, {result['checkpoints_valid']} valid signed checkpoints"
        f" ({result['checkpoints_chained']} chained), signed up to seq {result['last_signed_seq']},"
        f" {result['unsigned_tail']} records after the last checkpoint, {anchored}"
    )
    console.print(
        "[green]audit trail intact[/green]" if report.ok else "[red]audit trail FAILED verification[/red]"
    )
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("adopt-anchors")
def audit_adopt_anchors(config: ConfigOpt) -> None:
    """After a lost anchor file: verify the whole audit, then anchor the database's checkpoints anew.

    Only for an anchor file that is truly lost: anchors exist to catch a database whose newest
    checkpoints were deleted, which this command cannot tell from a loss. It refuses if the file
    still holds anchors."""
    from kms.audit.anchors import Anchor
    from kms.domain.audit_chain import Checkpoint

    rt, service = _audit_service(config)
    try:
        book_file = service.anchors
        assert book_file is not None
        if book_file.read():
            err.print(f"[red]error:[/red] {book_file.path} holds anchors; it is not lost")
            raise typer.Exit(1)
        report = service.verify()
        problems = [p for p in report.problems if "anchor file" not in p]
        if problems:
            for problem in problems:
                console.print(f"[red]TAMPERED[/red] {problem}")
            err.print("[red]error:[/red] the audit does not verify; nothing anchored")
            raise typer.Exit(1)
        chained = [c for c in service.checkpoints_raw() if isinstance(c, Checkpoint)]
        keys = {k.version: k.public_key for k in rt.identity.public_keys() if k.purpose == "sign"}
        with book_file.locked() as book:
            book.append([Anchor.of(cp, keys[cp.key_version]) for cp in chained])
    finally:
        rt.close()
    console.print(f"anchored {len(chained)} checkpoints in {book_file.path}")


@audit_app.command("export")
def audit_export(
    config: ConfigOpt, out: Annotated[Path, typer.Option("--out", help="File to write.")]
) -> None:
    """Write the audit trail (records and signed checkpoints) to a JSON file for offline verification."""
    from kms.service.audit_checkpoints import write_checkpoint

    rt, service = _audit_service(config)
    try:
        # Sign the head so the export is complete (anchored like the server's checkpoints).
        write_checkpoint(rt.db, rt.identity, rt.settings.kme.id, service.anchors)
        data = service.export()
    finally:
        rt.close()
    out.write_text(json.dumps(data, indent=1), encoding="utf-8")
    console.print(f"wrote {len(data['records'])} records and {len(data['checkpoints'])} checkpoints to {out}")


@keys_app.command("export-public")
def keys_export_public(
    config: ConfigOpt, out: Annotated[Path, typer.Option("--out", help="File to write.")]
) -> None:
    """Write the KME's public keys (every version) for peers and offline audit verification."""
    from kms.service.audit_queries import AuditService

    rt = _runtime(config)
    try:
        rt.identity.ensure()
        data = AuditService(rt.db, rt.identity, rt.settings.kme.id).public_keys()
    finally:
        rt.close()
    out.write_text(json.dumps(data, indent=1), encoding="utf-8")
    console.print(f"wrote {len(data['keys'])} public keys to {out}")


@keys_app.command("show")
def keys_show(config: ConfigOpt) -> None:
    """List the KME's identity keys: purpose, algorithm, version, state."""
    rt = _runtime(config)
    try:
        infos = rt.identity.public_keys()
    finally:
        rt.close()
    table = Table(title="KME identity keys")
    for col in ("purpose", "algorithm", "version", "state", "public key (first 16 bytes)"):
        table.add_column(col)
    for i in infos:
        table.add_row(i.purpose, i.algorithm, str(i.version), i.state, i.public_key[:16].hex())
    console.print(table)


@keys_app.command("rotate")
def keys_rotate(
    config: ConfigOpt, purpose: Annotated[str, typer.Option(help="'sign' (ML-DSA) or 'kem' (ML-KEM).")]
) -> None:
    """Create a new active version of a KME key; the old version is retired (still verifies/decapsulates)."""
    if purpose not in ("sign", "kem"):
        raise typer.BadParameter("--purpose must be 'sign' or 'kem'")
    rt = _runtime(config)
    try:
        version = rt.identity.rotate(purpose)
        _sign_pending(rt)
    finally:
        rt.close()
    console.print(f"{purpose} key is now version {version}")


@keys_app.command("destroy")
def keys_destroy(
    config: ConfigOpt,
    purpose: Annotated[str, typer.Option(help="'sign' or 'kem'.")],
    version: Annotated[int, typer.Option(help="A retired version.")],
) -> None:
    """Zeroise a retired key's private seed (its public key stays, so old signatures still verify).

    For a KEM key, do this once no key encapsulated to that version can still be fetched."""
    if purpose not in ("sign", "kem"):
        raise typer.BadParameter("--purpose must be 'sign' or 'kem'")
    rt = _runtime(config)
    try:
        if not rt.identity.destroy_retired(purpose, version):
            err.print(f"[red]error:[/red] {purpose} key version {version} is not a retired key")
            raise typer.Exit(1)
        _sign_pending(rt)
    finally:
        rt.close()
    console.print(f"{purpose} key version {version}: private seed destroyed")


def _link_transition(config: Path, change: Callable[[Any], Any]) -> Any:
    """Run the link use case ``change(db)`` (``kms.service.links``), then sign what it audited."""
    from kms.service.links import LinkStateError

    rt = _runtime(config)
    try:
        try:
            result = change(rt.db)
        except LinkStateError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        _sign_pending(rt)
    finally:
        rt.close()
    return result


@link_app.command("suspend")
def link_suspend(
    config: ConfigOpt,
    link_id: Annotated[str, typer.Argument(help="The link ID.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")] = "operator action",
) -> None:
    """Suspend a link: its blocks and the reserved keys cut from them are no longer served."""
    from kms.service import links

    change = _link_transition(config, lambda db: links.suspend(db, link_id, reason))
    console.print(f"link {link_id} suspended: {change.blocks} blocks, {change.keys} reserved keys")


@link_app.command("resume")
def link_resume(
    config: ConfigOpt,
    link_id: Annotated[str, typer.Argument(help="The link ID.")],
    discard: Annotated[
        bool, typer.Option(help="Destroy the suspended blocks and keys instead of reusing them.")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")] = "operator action",
) -> None:
    """Resume a suspended link (after investigating its alarm)."""
    from kms.service import links

    change = _link_transition(config, lambda db: links.resume(db, link_id, reason, discard))
    verb = "discarded" if discard else "kept"
    console.print(f"link {link_id} resumed ({verb} {change.blocks} blocks, {change.keys} keys)")
