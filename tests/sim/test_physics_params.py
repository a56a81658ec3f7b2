"""Presets and parameter validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkd_adapters.sim.params import (
    LinkParameters,
    ParameterError,
    list_presets,
    load_preset,
    load_spdc,
)


def test_presets_listed_and_gys_matches_ma_et_al() -> None:
    assert {"gys", "snspd-modern"} <= set(list_presets())
    p = load_preset("gys")
    # Ma, Qi, Zhao, Lo 2005, Table I: Y0 = 1.7e-6 for two detectors, eta_Bob 4.5 %, 0.21 dB/km
    assert p.y0 == pytest.approx(1.7e-6, rel=1e-6)
    assert p.bob_station_transmittance == pytest.approx(0.045)
    assert p.fibre_attenuation_db_per_km == 0.21
    assert p.misalignment == 0.033
    assert p.ec_inefficiency == 1.22
    assert p.clock_rate_hz == 2e6


def test_overrides_and_derived_quantities() -> None:
    p = load_preset("gys", clock_rate_hz=1e9, length_km=50.0)
    assert p.clock_rate_hz == 1e9
    assert p.transmittance == pytest.approx(0.045 * 10 ** (-0.21 * 50 / 10))
    assert p.p_vacuum == pytest.approx(1.0 - p.p_mu - p.p_nu)
    snspd = load_preset("snspd-modern")
    assert snspd.detector_efficiency >= 0.7
    assert snspd.dead_gates == 25
    assert load_spdc("gys").mean_pairs > 0


def test_load_from_file(tmp_path: Path) -> None:
    f = tmp_path / "link.toml"
    f.write_text('[link]\nname = "lab"\nlength_km = 12.5\nmu = 0.4\nnu = 0.1\n', encoding="utf-8")
    p = load_preset(f, misalignment=0.02)
    assert (p.name, p.length_km, p.mu, p.misalignment) == ("lab", 12.5, 0.4, 0.02)


@pytest.mark.parametrize(
    "bad",
    [
        {"mu": 0.1, "nu": 0.2},
        {"p_mu": 0.9, "p_nu": 0.2},
        {"misalignment": 0.7},
        {"clock_rate_hz": 0.0},
        {"ec_inefficiency": 0.9},
        {"eps_sec": 0.0},
    ],
)
def test_invalid_parameters_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ParameterError):
        LinkParameters(**bad)  # type: ignore[arg-type]


def test_unknown_preset_and_field() -> None:
    with pytest.raises(ParameterError):
        load_preset("no-such-preset")
    with pytest.raises(ParameterError):
        load_preset("gys", warp_factor=9)
