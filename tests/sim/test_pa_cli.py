"""`qkms sim run` names the privacy-amplification family of the blocks it ran, and refuses an unknown one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _sim_run(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "sim",
            "run",
            "--seconds",
            "1",
            "--block-seconds",
            "1",
            "--seed",
            "3",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.parametrize(
    ("extra", "shown"),
    [((), "multiply-add-shift (strongly universal)"), (("--pa-family", "toeplitz"), "toeplitz (universal)")],
)
def test_sim_run_names_the_family(extra: tuple[str, ...], shown: str) -> None:
    res = _sim_run(*extra)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if "privacy amplification" in line)
    assert row.split("│")[2].strip() == shown


def test_sim_run_refuses_an_unknown_family() -> None:
    res = _sim_run("--pa-family", "md5")
    out = res.stderr + res.stdout
    assert res.returncode == 2 and "unknown privacy-amplification family 'md5'" in " ".join(out.split())
    assert "Traceback" not in out
