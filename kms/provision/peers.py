"""Joining KMEs into a network: export this KME's bundle, install a peer's, declare a shared link.

These edit a working directory made by ``qkms init`` (its ``qkms.toml`` and a ``peers/`` folder);
the server reads them at start.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from kms.config import KmsSettings
from kms.peer.bundle import BundleError, load_bundle, make_bundle


def export_bundle(config_path: Path, out: Path) -> Path:
    """Write this KME's public peer bundle to ``out``."""
    from kms.runtime.assembly import build_runtime
    from kms.service.audit_queries import AuditService

    settings = KmsSettings.load(config_path)
    rt = build_runtime(settings, sync_registry=False)
    try:
        rt.identity.ensure()
        keys = AuditService(rt.db, rt.identity, settings.kme.id).public_keys()["keys"]
    finally:
        rt.close()
    bundle = make_bundle(
        settings.kme.id,
        settings.tls.ca_cert,
        settings.peering.client_cert,
        keys,
        [s.id for s in settings.saes],
    )
    out.write_text(json.dumps(bundle.to_json(), indent=1), encoding="utf-8")
    return out


def add_peer(config_path: Path, bundle_path: Path, url: str | None) -> str:
    """Install another KME's bundle (copied to ``peers/<KME>.json``) and list it in the config."""
    bundle = load_bundle(bundle_path)
    config = _read(config_path)
    if bundle.kme_id == config["kme"]["id"]:
        raise BundleError("that bundle is this KME's own")
    target = config_path.parent / "peers" / f"{bundle.kme_id}.json"
    target.parent.mkdir(exist_ok=True)
    if bundle_path.resolve() != target.resolve():
        shutil.copyfile(bundle_path, target)
    entry: dict[str, Any] = {"kme_id": bundle.kme_id, "bundle": f"peers/{bundle.kme_id}.json"}
    if url:
        entry["url"] = url
    peers = [p for p in config.get("peers", []) if p.get("kme_id") != bundle.kme_id]
    config["peers"] = [*peers, entry]
    _write(config_path, config)
    return bundle.kme_id


def add_link(config_path: Path, link_id: str, peer_kme_id: str, source: str, options: dict[str, Any]) -> None:
    """Declare a link shared with ``peer_kme_id`` (the same ``link_id`` at both ends)."""
    config = _read(config_path)
    links = [lk for lk in config.get("links", []) if lk.get("id") != link_id]
    config["links"] = [
        *links,
        {"id": link_id, "peer_kme_id": peer_kme_id, "source": source, "options": options},
    ]
    _write(config_path, config)


def _read(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    KmsSettings.load(path)  # refuse to leave an invalid file behind unnoticed
