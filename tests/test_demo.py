"""The README's main job, `qkms demo` (what `scripts/demo.sh` runs), end to end: a real KME over
mTLS on 127.0.0.1 with a simulated QKD link, three SAEs, and the rules it prints. A change of the
KME's promises (such as the redelivery window) must be reflected in what the demo shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_succeeds_and_prints_no_key_material(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kms", "demo", "--dir", str(tmp_path / "demo-run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "demo succeeded" in out
    assert "the same key again inside the redelivery window: yes" in " ".join(out.split())
    assert "401" in out
    assert '"key":' not in out  # key IDs and outcomes only, never a key
