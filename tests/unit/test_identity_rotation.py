"""KME identity keys: created once, rotated with versions; old signatures keep verifying."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kms.config import KmsSettings
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import build_runtime
from kms.service.audit_checkpoints import write_checkpoint
from kms.service.audit_queries import AuditService


def test_rotation_keeps_old_checkpoints_verifiable(tmp_path: Path) -> None:
    res = init_workdir(tmp_path / "kme", "KME-R", ["A", "B"], link_source="random")
    rt = build_runtime(KmsSettings.load(res.config_path))
    try:
        rt.make_filler().fill_once()
        first = write_checkpoint(rt.db, rt.identity, "KME-R")
        assert first is not None and first.key_version == 1 and first.algorithm == "ML-DSA-65"
        assert rt.identity.rotate("sign") == 2
        rt.service.get_keys(rt.registry.get("A"), "B")  # type: ignore[arg-type]
        second = write_checkpoint(rt.db, rt.identity, "KME-R")
        assert second is not None and second.key_version == 2
        audit = AuditService(rt.db, rt.identity, "KME-R")
        report = audit.verify()
        assert report.ok and report.checkpoints_valid == 2
        actions = [r["action"] for r in audit.events(limit=1000)["records"]]
        assert "identity.rotated" in actions
        keys = {(k.purpose, k.version): k.state for k in rt.identity.public_keys()}
        assert keys == {("sign", 1): "retired", ("sign", 2): "active", ("kem", 1): "active"}
    finally:
        rt.close()

    out = subprocess.run(
        [sys.executable, "-m", "kms", "keys", "rotate", "--purpose", "kem", "--config", str(res.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "version 2" in out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "keys",
            "rotate",
            "--purpose",
            "nope",
            "--config",
            str(res.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    destroy = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "keys",
            "destroy",
            "--purpose",
            "sign",
            "--version",
            "1",
            "--config",
            str(res.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert destroy.returncode == 0, destroy.stderr
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "keys",
            "destroy",
            "--purpose",
            "sign",
            "--version",
            "2",
            "--config",
            str(res.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "not a retired key" in again.stderr
    rt = build_runtime(KmsSettings.load(res.config_path), sync_registry=False)
    try:
        assert (
            AuditService(rt.db, rt.identity, "KME-R").verify().ok
        )  # version 1 still verifies its checkpoint
        assert {(k.purpose, k.version): k.state for k in rt.identity.public_keys()}[
            ("sign", 1)
        ] == "destroyed"
    finally:
        rt.close()
