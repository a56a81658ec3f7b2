"""The backup file: a tar archive of a manifest, its MAC, the database snapshot and the configuration.

``manifest.json`` names the KME, the backend, the schema revision, the audit head at the snapshot,
the KEK *references* of the keyring (never a key) and the SHA-256 of each other member;
``manifest.mac`` is an HMAC of the manifest under a key derived from the active KEK version
(``Envelope.mac``). Someone without the KEK can therefore neither alter a member (its digest
changes) nor the manifest (its MAC fails) unnoticed, and the MAC proves which KEK the backup belongs
to (docs/DECISIONS.md D-28). Reading checks the structure before anything is unpacked: exactly the
expected members, regular files, bounded sizes.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "qkms-backup"
VERSION = 1
MANIFEST, MAC, CONFIG = "manifest.json", "manifest.mac", "qkms.toml"
DATABASE = {"sqlite": "database.sqlite", "postgresql": "database.pgdump"}
_MAX_SMALL = 1024 * 1024


class BackupFileError(RuntimeError):
    """The backup file is unreadable, damaged or tampered; the message is one line."""


@dataclass(frozen=True)
class Archive:
    path: Path
    manifest: dict[str, Any]
    manifest_raw: bytes
    mac: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def write(out: Path, manifest_raw: bytes, mac: str, database: tuple[str, Path], config: Path) -> None:
    """Write the archive to ``out`` (created 0600, never over an existing file)."""
    import os

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
        for name, data in ((MANIFEST, manifest_raw), (MAC, mac.encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
        tar.add(str(database[1]), arcname=database[0], recursive=False)
        tar.add(str(config), arcname=CONFIG, recursive=False)
        fh.flush()
        os.fsync(fh.fileno())


def read(path: Path) -> Archive:
    """The manifest and MAC of the archive at ``path``, after checking its shape."""
    bad = f"{path} is not a QKMS backup (damaged or tampered)"
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            if not all(m.isfile() for m in members.values()):
                raise BackupFileError(bad)
            raw = _small(tar, members.get(MANIFEST), bad)
            mac = _small(tar, members.get(MAC), bad).decode("ascii", "replace")
    except FileNotFoundError as exc:
        raise BackupFileError(f"backup file not found: {path}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise BackupFileError(bad) from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BackupFileError(bad) from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        raise BackupFileError(bad)
    expected = {MANIFEST, MAC, CONFIG, DATABASE.get(str(manifest.get("backend")), "?")}
    if set(members) != expected:
        raise BackupFileError(bad)
    return Archive(path, manifest, raw, mac)


def verify_members(archive: Archive) -> None:
    """Raise unless every member has the digest the manifest (authenticated by the caller) names."""
    tampered = f"{archive.path} was tampered with or damaged"
    digests = archive.manifest.get("digests") or {}
    with tarfile.open(archive.path, mode="r:") as tar:
        for member in tar.getmembers():
            if member.name in (MANIFEST, MAC):
                continue
            fh = tar.extractfile(member)
            if fh is None:
                raise BackupFileError(tampered)
            digest = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023 - consumed in the loop
                digest.update(chunk)
            if not hmac.compare_digest(digest.hexdigest(), str(digests.get(member.name, ""))):
                raise BackupFileError(f"{tampered}: {member.name} does not match its digest")


def extract(archive: Archive, name: str, dest: Path) -> None:
    """Copy member ``name`` to ``dest`` (created 0600)."""
    import os

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, tarfile.open(archive.path, mode="r:") as tar:
        src = tar.extractfile(name)
        if src is None:
            raise BackupFileError(f"{archive.path} is not a QKMS backup (damaged or tampered)")
        for chunk in iter(lambda: src.read(1 << 20), b""):
            out.write(chunk)


def _small(tar: tarfile.TarFile, member: tarfile.TarInfo | None, bad: str) -> bytes:
    if member is None or member.size > _MAX_SMALL:
        raise BackupFileError(bad)
    fh = tar.extractfile(member)
    if fh is None:
        raise BackupFileError(bad)
    return fh.read()
