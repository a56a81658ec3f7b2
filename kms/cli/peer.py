"""``qkms peer``: join this KME to others (bundles, peers, shared links)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kms.config import ConfigError

peer_app = typer.Typer(
    help="KME-to-KME peering: export this KME's bundle, add a peer, declare a shared link.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")]


@peer_app.command("export")
def export(
    config: ConfigOpt, out: Annotated[Path, typer.Option("--out", help="Bundle file to write.")]
) -> None:
    """Write this KME's peer bundle: CA certificate, KME client-certificate fingerprint, ML-DSA and
    ML-KEM public keys, SAE IDs. Public material only; give it to the peer KMEs' operators."""
    from kms.peer.bundle import BundleError
    from kms.provision.peers import export_bundle

    try:
        export_bundle(config, out)
    except (ConfigError, BundleError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote peer bundle to {out}")


@peer_app.command("add")
def add(
    config: ConfigOpt,
    bundle: Annotated[
        Path, typer.Option("--bundle", help="The peer KME's bundle (from `qkms peer export`).")
    ],
    url: Annotated[
        str | None,
        typer.Option("--url", help="https://host:port of the peer, if this KME shares a link with it."),
    ] = None,
) -> None:
    """Trust another KME: install its bundle and list it in this KME's config (restart to apply)."""
    from kms.peer.bundle import BundleError
    from kms.provision.peers import add_peer

    try:
        kme_id = add_peer(config, bundle, url)
    except (ConfigError, BundleError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"peer {kme_id} added to {config}")


@peer_app.command("link")
def link(
    config: ConfigOpt,
    link_id: Annotated[str, typer.Option("--link-id", help="The link's ID; the same at both ends.")],
    peer: Annotated[str, typer.Option("--peer", help="The KME at the link's other end.")],
    source: Annotated[str, typer.Option(help="Adapter: random | simulated | key-files | etsi014.")],
    options: Annotated[str, typer.Option(help="Adapter options as a JSON object.")] = "{}",
) -> None:
    """Declare a QKD link shared with a peer KME (both ends must declare it with the same ID)."""
    from kms.provision.peers import add_link

    try:
        parsed = json.loads(options)
        if not isinstance(parsed, dict):
            raise ValueError("--options must be a JSON object")
        add_link(config, link_id, peer, source, parsed)
    except (ValueError, ConfigError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"link {link_id} to {peer} added to {config}")


@peer_app.command("tell-restored")
def tell_restored(config: ConfigOpt) -> None:
    """Tell every adjacent peer KME (again) that this KME was restored from a backup, so that each
    retires its pieces of the blocks shared with it (done by `qkms restore` itself when it can)."""
    from kms.cli.backup import _settings, tell_peers_restored

    if not tell_peers_restored(_settings(config)):
        raise typer.Exit(3)
