"""matplotlib is an extra (``qkms[plots]``): without it ``qkms sim keyrate`` says so in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kms.cli.main import app


def test_keyrate_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    out = tmp_path / "rate.png"
    res = CliRunner().invoke(app, ["sim", "keyrate", "--out", str(out), "--mc-distances", ""])
    assert res.exit_code == 2, res.output
    assert "pip install 'qkms[plots]'" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_the_plot_module_imports_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "qkd_adapters.sim.plot", raising=False)
    from qkd_adapters.sim.params import load_preset
    from qkd_adapters.sim.plot import plot_key_rate_vs_distance

    with pytest.raises(ModuleNotFoundError, match=r"pip install 'qkms\[plots\]'") as info:
        plot_key_rate_vs_distance(load_preset("gys"), tmp_path / "rate.png")
    assert info.value.name == "matplotlib" and not (tmp_path / "rate.png").exists()
