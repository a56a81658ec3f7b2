"""Where each KEK version comes from: a *reference* (never the key) that any process can load.

A reference is a small JSON-able dict stored in the database's keyring (``kek_versions``,
docs/DECISIONS.md D-27) and in backups: ``{"source": "file", "path": ...}``, ``{"source": "env",
"var": ...}`` or ``{"source": "pkcs11", module, token_label, key_label, wrapped_kek_file, pin_env}``.
Every failure is a one-line :class:`~kms.crypto.envelope.KekError`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from kms.crypto.envelope import KekError, generate_kek_file, load_kek_env, load_kek_file

Reference = dict[str, Any]
SOURCES = ("file", "env", "pkcs11")


def file_reference(path: Path) -> Reference:
    return {"source": "file", "path": str(Path(path).resolve())}


def env_reference(var: str) -> Reference:
    return {"source": "env", "var": var}


def pkcs11_reference(fields: dict[str, Any]) -> Reference:
    keep = ("module", "token_label", "key_label", "wrapped_kek_file", "pin_env")
    return {"source": "pkcs11", **{k: str(fields[k]) for k in keep}}


def describe(ref: Reference) -> str:
    """A one-line description for messages and tables (no secret in any reference)."""
    if ref.get("source") == "file":
        return f"file {ref.get('path')}"
    if ref.get("source") == "env":
        return f"environment variable {ref.get('var')}"
    return f"PKCS#11 token {ref.get('token_label')!r}, wrapped file {ref.get('wrapped_kek_file')}"


def load(ref: Reference) -> bytes:
    """The 32-byte KEK a reference names."""
    source = ref.get("source")
    if source == "file":
        return load_kek_file(Path(str(ref["path"])))
    if source == "env":
        return load_kek_env(str(ref["var"]))
    if source == "pkcs11":
        from kms.crypto.kek_pkcs11 import load_kek_pkcs11

        return load_kek_pkcs11(_pkcs11_config(ref))
    raise KekError(f"unknown KEK source {source!r}")


def create(ref: Reference, kek_id: str, env_var: str | None = None) -> Reference:
    """Make a new KEK of the same kind as ``ref`` (the active version's) and return its reference.

    file: a fresh random file (0600) next to the current one, named after ``kek_id``; pkcs11: a new
    KEK generated in the same token and wrapped by the same wrapping key into a new file; env: the
    operator provides the new KEK in ``env_var`` (a process cannot set another's environment).
    """
    source = ref.get("source")
    if env_var is not None:
        new = env_reference(env_var)
        load(new)  # it must be there and well formed before anything changes
        return new
    if source == "env":
        raise KekError(
            "the active KEK comes from an environment variable: give the new one with --env-var NAME"
        )
    tag = f"{kek_id}-{secrets.token_hex(4)}"
    if source == "file":
        path = Path(str(ref["path"])).with_name(f"{tag}.bin")
        generate_kek_file(path)
        return file_reference(path)
    if source == "pkcs11":
        from kms.crypto.kek_pkcs11 import provision_wrapped_kek

        old = Path(str(ref["wrapped_kek_file"]))
        new_ref = {**ref, "wrapped_kek_file": str(old.with_name(f"{tag}.wrapped.json"))}
        provision_wrapped_kek(_pkcs11_config(new_ref))
        return new_ref
    raise KekError(f"unknown KEK source {source!r}")


def destroy(ref: Reference) -> str:
    """Destroy what a retired version's reference points at; returns what was done (one line).

    A file is overwritten with zeros, synced and unlinked (a copy on a backup medium is the operator's
    to destroy); a PKCS#11 wrapped file is unlinked (without it the token cannot unwrap that KEK);
    an environment variable cannot be removed from other processes, so the operator is told to."""
    source = ref.get("source")
    if source in ("file", "pkcs11"):
        path = Path(str(ref["path"] if source == "file" else ref["wrapped_kek_file"]))
        if not path.exists():
            return f"{path} was already gone"
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            with path.open("r+b") as fh:
                fh.write(bytes(size))
                fh.flush()
                os.fsync(fh.fileno())
        path.unlink()
        return f"overwrote and removed {path}"
    return f"remove environment variable {ref.get('var')} from every KME process's environment"


def _pkcs11_config(ref: Reference) -> Any:
    from kms.crypto.kek_pkcs11 import Pkcs11KekConfig

    return Pkcs11KekConfig(
        module=Path(str(ref["module"])),
        token_label=str(ref["token_label"]),
        key_label=str(ref["key_label"]),
        wrapped_kek_file=Path(str(ref["wrapped_kek_file"])),
        pin_env=str(ref["pin_env"]),
    )
