"""``qkms sae``: the SAE lifecycle without restarts (docs/OPERATIONS.md "SAE lifecycle", DECISIONS.md D-29).

Each command is one audited use case of ``kms.service.sae_lifecycle``. It returns only once every
serving process has had ``sae_registry.refresh_ms`` to see the change, so a request that begins
after the command returns is judged by the new registry. ``certificate_expiries`` is what
``qkms status`` shows of the certificates' lifetimes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kms.config import ConfigError, KmsSettings

sae_app = typer.Typer(
    help="SAE lifecycle: add, list, rotate, suspend, resume, revoke (no restart needed).",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]
SaeArg = Annotated[str, typer.Argument(help="The SAE ID (its certificate's CN).")]
ReasonOpt = Annotated[str, typer.Option(help="Why (recorded in the audit trail).")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(1)


def _settings(config: Path) -> KmsSettings:
    try:
        return KmsSettings.load(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@contextmanager
def _change(config: Path) -> Iterator[tuple[KmsSettings, Any]]:
    """The KME's runtime for one change; refusals become one-line errors (exit 1); afterwards the
    audit is signed and the propagation interval waited out."""
    from kms.cli.admin import _sign_pending
    from kms.crypto.sae_certs import CertificateRefused
    from kms.runtime.assembly import build_runtime
    from kms.service.sae_lifecycle import SaeLifecycleError

    settings = _settings(config)
    rt = build_runtime(settings, sync_registry=False)
    try:
        try:
            yield settings, rt
        except (SaeLifecycleError, CertificateRefused) as exc:
            raise _fail(str(exc)) from None
        _sign_pending(rt)
    finally:
        rt.close()
    time.sleep(settings.sae_registry.refresh_ms / 1000 + 0.05)


def _new_certificate(settings: KmsSettings, sae_id: str, cert: Path | None, ca: Path | None) -> Any:
    from kms.crypto.sae_certs import CertificateRefused
    from kms.provision import sae_credentials

    if ca is not None and cert is None:
        raise CertificateRefused("--ca names the issuer of --cert; give --cert too")
    if cert is None:
        return sae_credentials.issue(settings, sae_id)
    return sae_credentials.from_file(settings, sae_id, cert, ca)


CertOpt = Annotated[
    Path | None,
    typer.Option(
        "--cert", help="Pin this client certificate (PEM/DER) instead of issuing one from the site CA."
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca", help="The enterprise CA that issued --cert (trusted for the TLS handshake from now on)."
    ),
]


@sae_app.command("add")
def sae_add(
    config: ConfigOpt,
    sae_id: SaeArg,
    cert: CertOpt = None,
    ca: CaOpt = None,
    issue: Annotated[
        bool, typer.Option("--issue", help="Issue from the site CA (the default without --cert).")
    ] = False,
) -> None:
    """Register a new SAE: a certificate issued from the site CA (pki/sae/<ID>.pem|.key) or one pinned from --cert."""
    from kms.provision.sae_credentials import write_issued
    from kms.service import sae_lifecycle

    if issue and cert is not None:
        raise _fail("--issue and --cert are alternatives")
    with _change(config) as (settings, rt):
        sae_lifecycle.check_new_sae(rt.db, sae_id)
        new = _new_certificate(settings, sae_id, cert, ca)
        change = sae_lifecycle.add(rt.db, settings.kme.id, sae_id, new.certificate)
        paths = write_issued(settings, sae_id, new)
    console.print(f"SAE {sae_id} added, certificate {change.fingerprint[:16]}... pinned")
    if paths:
        console.print(f"  credential: {paths[0]} / {paths[1]}")


@sae_app.command("rotate")
def sae_rotate(
    config: ConfigOpt,
    sae_id: SaeArg,
    cert: CertOpt = None,
    ca: CaOpt = None,
    grace_hours: Annotated[
        float | None,
        typer.Option(
            help="How long the previous certificate stays valid (default sae_registry.rotation_grace_hours)."
        ),
    ] = None,
) -> None:
    """Give an SAE a new certificate; the previous one is accepted for the grace period."""
    from kms.provision.sae_credentials import write_issued
    from kms.service import sae_lifecycle

    if grace_hours is not None and not 0 <= grace_hours <= 24 * 90:
        raise _fail("--grace-hours must be between 0 and 2160")
    with _change(config) as (settings, rt):
        hours = settings.sae_registry.rotation_grace_hours if grace_hours is None else grace_hours
        new = _new_certificate(settings, sae_id, cert, ca)
        change = sae_lifecycle.rotate(rt.db, settings.kme.id, sae_id, new.certificate, timedelta(hours=hours))
        paths = write_issued(settings, sae_id, new)
    console.print(
        f"SAE {sae_id}: certificate {change.fingerprint[:16]}... pinned; the previous one is accepted for {hours:g} h"
    )
    if paths:
        console.print(f"  credential: {paths[0]} / {paths[1]}")


def _state_change(config: Path, sae_id: str, change: Callable[[Any, str], Any]) -> Any:
    with _change(config) as (settings, rt):
        return change(rt, settings.kme.id)


@sae_app.command("suspend")
def sae_suspend(config: ConfigOpt, sae_id: SaeArg, reason: ReasonOpt = "operator action") -> None:
    """Refuse the SAE's requests until it is resumed (its keys are kept and expire as usual)."""
    from kms.service import sae_lifecycle

    _state_change(config, sae_id, lambda rt, kme: sae_lifecycle.suspend(rt.db, kme, sae_id, reason))
    console.print(f"SAE {sae_id} suspended")
    _tell_peers(config, [sae_id])


@sae_app.command("resume")
def sae_resume(config: ConfigOpt, sae_id: SaeArg, reason: ReasonOpt = "operator action") -> None:
    """Serve a suspended SAE again."""
    from kms.service import sae_lifecycle

    _state_change(config, sae_id, lambda rt, kme: sae_lifecycle.resume(rt.db, kme, sae_id, reason))
    console.print(f"SAE {sae_id} resumed")
    _tell_peers(config, [sae_id])


@sae_app.command("revoke")
def sae_revoke(config: ConfigOpt, sae_id: SaeArg, reason: ReasonOpt = "operator action") -> None:
    """Refuse the SAE for good and destroy every key it requested or may fetch that is not yet fetched."""
    from kms.service import sae_lifecycle

    change = _state_change(config, sae_id, lambda rt, kme: sae_lifecycle.revoke(rt.db, kme, sae_id, reason))
    # Requests authenticated just before every process saw the revocation may have reserved keys since.
    late = _state_change(config, sae_id, lambda rt, kme: sae_lifecycle.sweep_revoked(rt.db, kme, sae_id))
    destroyed = change.keys_destroyed + late.keys_destroyed
    zeroised = change.redelivery_zeroised + late.redelivery_zeroised
    console.print(
        f"SAE {sae_id} revoked: {destroyed} unfetched keys destroyed, {zeroised} consumed keys' redelivery copies zeroised"
    )
    _tell_peers(config, [sae_id])


@sae_app.command("tell-peers")
def sae_tell_peers(
    config: ConfigOpt,
    sae_ids: Annotated[
        list[str] | None, typer.Argument(help="SAEs of this KME (default: every one not active).")
    ] = None,
) -> None:
    """Tell every peer KME the state of this KME's SAEs again (after a peer was unreachable)."""
    _tell_peers(config, sae_ids or None)


def _tell_peers(config: Path, sae_ids: list[str] | None) -> None:
    """Tell every peer KME (signed ``sae.state``, DECISIONS.md D-39) the SAEs' current state, audit
    who was told (``sae.peer_told``); exit 3 if some KME was not told (the change here stands)."""
    from kms.cli.admin import _sign_pending
    from kms.runtime.assembly import build_runtime
    from kms.service import peer_sae_states

    settings = _settings(config)
    if not settings.peers:
        return
    rt = build_runtime(settings, sync_registry=False)
    missed: list[str] = []
    try:
        assert rt.network is not None
        try:
            notices = peer_sae_states.notices_of(rt.db, settings.kme.id, sae_ids)
        except peer_sae_states.SaeNoticeError as exc:
            raise _fail(str(exc)) from None
        for notice in notices:
            outcomes = rt.network.sae_notices.tell([notice])
            peer_sae_states.record_told(rt.db, notice, outcomes)
            for kme_id, outcome in outcomes.items():
                if not outcome["told"]:
                    missed.append(kme_id)
                    err.print(
                        f"[yellow]KME {kme_id} not told that {notice.sae_id} is {notice.state.value}:[/yellow] {outcome['error']}"
                    )
                    continue
                done = sum(int(r.get("keys_destroyed", 0)) for r in outcome["results"])
                console.print(
                    f"  KME {kme_id} told: {notice.sae_id} {notice.state.value}, {done} keys destroyed there"
                )
        _sign_pending(rt)
    finally:
        rt.close()
    if missed:
        err.print(f"run `qkms sae tell-peers` again once {', '.join(sorted(set(missed)))} can be reached")
        raise typer.Exit(3)


@sae_app.command("list")
def sae_list(config: ConfigOpt) -> None:
    """Every registered SAE (and auditor) with its state and pinned certificates."""
    from kms.service.sae_lifecycle import listing
    from kms.storage.database import Database

    settings = _settings(config)
    db = Database(settings.database.url, pool_size=1)
    try:
        records, certificates = listing(db)
    finally:
        db.dispose()
    by_sae: dict[str, list[str]] = {}
    for c in certificates:
        if c.state != "retired":
            until = f" until {c.valid_until:%Y-%m-%d %H:%M}" if c.state == "grace" and c.valid_until else ""
            by_sae.setdefault(c.sae_id, []).append(
                f"{c.state}{until}: {c.certificate.origin}, expires {c.certificate.not_after:%Y-%m-%d}"
            )
    table = Table(title=f"KME {settings.kme.id}: registered entities")
    for col in (
        "ID",
        "role",
        "KME",
        "state",
        "certificate (SHA-256)",
        "pinned certificates",
        "managed by",
        "reason",
    ):
        table.add_column(col)
    for r in records:
        table.add_row(
            r.sae_id,
            r.role,
            r.kme_id,
            r.state.value,
            r.fingerprint[:16] + "...",
            "; ".join(by_sae.get(r.sae_id, [])) or "-",
            r.managed_by,
            r.reason or "",
        )
    console.print(table)


# --------------------------------------------------------------------------- certificate expiry


@dataclass(frozen=True)
class Expiry:
    what: str
    subject: str
    not_after: datetime

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def certificate_expiries(settings: KmsSettings) -> list[Expiry]:
    """The lifetimes of the KME's certificates, its CA and trusted CAs, its peers' CAs and the SAEs'
    pinned certificates (those from ``qkms init`` read from pki/sae when the file is the pinned one)."""
    from kms.crypto.sae_certs import read_certificate, trusted_anchors
    from kms.provision.sae_credentials import trusted_ca_dir

    found: list[Expiry] = []

    def add(what: str, data: bytes) -> None:
        cert = read_certificate(data, what)
        found.append(Expiry(what, cert.subject.rfc4514_string(), cert.not_valid_after_utc))

    for what, path in (
        ("site CA", settings.tls.ca_cert),
        ("KME server certificate", settings.tls.server_cert),
        ("KME client certificate (peers)", settings.peering.client_cert),
    ):
        if path.is_file():
            add(what, path.read_bytes())
    for ca in trusted_anchors(trusted_ca_dir(settings)):
        found.append(Expiry("trusted enterprise CA", ca.subject.rfc4514_string(), ca.not_valid_after_utc))
    for peer in settings.peers:
        from kms.peer.bundle import load_bundle

        add(f"peer {peer.kme_id}'s CA", load_bundle(peer.bundle).ca_cert_pem.encode())
    found += _sae_expiries(settings)
    return found


def _sae_expiries(settings: KmsSettings) -> list[Expiry]:
    from kms.crypto.pki import fingerprint_sha256
    from kms.provision.workdir import sae_credential_paths
    from kms.service.sae_lifecycle import listing
    from kms.storage.database import Database

    db = Database(settings.database.url, pool_size=1)
    try:
        records, certificates = listing(db)
    finally:
        db.dispose()
    found = [
        Expiry(f"SAE {c.sae_id} ({c.state})", c.certificate.subject, c.certificate.not_after)
        for c in certificates
        if c.state in ("current", "grace")
    ]
    pinned = {c.certificate.fingerprint for c in certificates}
    for r in records:
        if r.role != "sae" or r.state.value == "revoked" or r.fingerprint in pinned:
            continue
        path = sae_credential_paths(settings.config_dir, r.sae_id)[0]
        if path.is_file() and fingerprint_sha256(path.read_bytes()) == r.fingerprint:
            from kms.crypto.sae_certs import read_certificate

            cert = read_certificate(path.read_bytes(), str(path))
            found.append(
                Expiry(f"SAE {r.sae_id} (current)", cert.subject.rfc4514_string(), cert.not_valid_after_utc)
            )
    return found


def expiry_table(settings: KmsSettings) -> tuple[Table, list[str]]:
    """``qkms status``'s certificate table and its warnings (expired, or within the warning window)."""
    now = datetime.now(UTC)
    warn_days = settings.sae_registry.expiry_warning_days
    table = Table(title="certificates")
    for col in ("certificate", "subject", "expires (UTC)", "days left", ""):
        table.add_column(col)
    warnings: list[str] = []
    for e in sorted(certificate_expiries(settings), key=lambda e: e.not_after):
        days = e.days_left(now)
        if days <= 0:
            mark = "[red]EXPIRED[/red]"
            warnings.append(f"{e.what} ({e.subject}) expired on {e.not_after:%Y-%m-%d}")
        elif days <= warn_days:
            mark = "[yellow]renew soon[/yellow]"
            warnings.append(f"{e.what} ({e.subject}) expires in {days:.0f} days, on {e.not_after:%Y-%m-%d}")
        else:
            mark = "ok"
        table.add_row(e.what, e.subject, f"{e.not_after:%Y-%m-%d %H:%M}", f"{days:.0f}", mark)
    return table, warnings
