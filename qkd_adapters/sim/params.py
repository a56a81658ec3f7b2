"""Parameters of a simulated QKD link, loaded from TOML presets or files.

Two frozen dataclasses carry everything the physics, the analytic formulas and the finite-key
bound need: :class:`LinkParameters` (fibre, detectors, weak-coherent source, protocol choices,
security parameters) and :class:`SPDCParameters` (the entangled-pair source for BBM92, which
shares the fibre and detectors of a :class:`LinkParameters`).

A preset is a TOML file with a ``[link]`` table and an optional ``[spdc]`` table; presets ship in
``qkd_adapters/sim/presets/``. Conventions: the *dark-count probability* is per detector and per
gate; Bob has two detectors, so the vacuum yield is ``Y0 = 1 - (1 - pd)^2`` (Ma, Qi, Zhao, Lo,
PRA 72, 012326 (2005) quote ``Y0 = 1.7e-6`` for GYS, i.e. ``pd = 8.5e-7``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PRESET_PACKAGE = "qkd_adapters.sim.presets"


class ParameterError(ValueError):
    """A parameter set is malformed or physically meaningless."""


@dataclass(frozen=True)
class LinkParameters:
    """One prepare-and-measure link (decoy-state BB84) and its analysis settings.

    Intensities are mean photon numbers of the phase-randomised weak coherent pulses: the signal
    ``mu``, the weak decoy ``nu`` and the (near-)vacuum decoy ``vacuum``; they must satisfy
    ``mu > nu + vacuum`` and ``nu > vacuum >= 0`` (Lim et al., PRA 89, 022307 (2014)).
    ``p_z`` is the probability that Alice (and, independently, Bob) picks the Z (key) basis.
    """

    name: str = "custom"
    wavelength_nm: float = 1550.0
    fibre_attenuation_db_per_km: float = 0.2
    length_km: float = 25.0
    insertion_loss_db: float = 0.0
    misalignment: float = 0.01
    detector_efficiency: float = 0.1
    dark_count_prob: float = 1e-6
    afterpulse_prob: float = 0.0
    afterpulse_delay_s: float = 0.0
    dead_time_s: float = 0.0
    clock_rate_hz: float = 1e9
    mu: float = 0.5
    nu: float = 0.1
    vacuum: float = 0.0
    p_mu: float = 0.8
    p_nu: float = 0.15
    p_z: float = 0.9
    ec_inefficiency: float = 1.16
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15

    def __post_init__(self) -> None:
        _check_probability("misalignment", self.misalignment, upper=0.5)
        _check_probability("detector_efficiency", self.detector_efficiency, lower_open=True)
        _check_probability("dark_count_prob", self.dark_count_prob, upper=0.5)
        _check_probability("afterpulse_prob", self.afterpulse_prob, upper=0.999)
        _check_probability("p_mu", self.p_mu, lower_open=True)
        _check_probability("p_nu", self.p_nu)
        _check_probability("p_z", self.p_z, lower_open=True)
        for label, value in (
            ("fibre_attenuation_db_per_km", self.fibre_attenuation_db_per_km),
            ("length_km", self.length_km),
            ("insertion_loss_db", self.insertion_loss_db),
            ("dead_time_s", self.dead_time_s),
            ("afterpulse_delay_s", self.afterpulse_delay_s),
            ("vacuum", self.vacuum),
        ):
            if not (math.isfinite(value) and value >= 0.0):
                raise ParameterError(f"{label} must be finite and >= 0")
        if not (self.clock_rate_hz > 0.0 and math.isfinite(self.clock_rate_hz)):
            raise ParameterError("clock_rate_hz must be positive")
        if self.p_mu + self.p_nu > 1.0 + 1e-12:
            raise ParameterError("p_mu + p_nu must not exceed 1 (the rest is the vacuum decoy)")
        if not (self.mu > self.nu + self.vacuum and self.nu > self.vacuum):
            raise ParameterError("intensities must satisfy mu > nu + vacuum and nu > vacuum >= 0")
        if self.ec_inefficiency < 1.0:
            raise ParameterError("ec_inefficiency (f) must be >= 1")
        for label, eps in (("eps_sec", self.eps_sec), ("eps_cor", self.eps_cor)):
            if not 0.0 < eps < 1.0:
                raise ParameterError(f"{label} must lie in (0, 1)")

    @property
    def p_vacuum(self) -> float:
        """Probability of the vacuum (lowest) decoy intensity."""
        return max(0.0, 1.0 - self.p_mu - self.p_nu)

    @property
    def intensities(self) -> tuple[float, float, float]:
        """(signal, weak decoy, vacuum decoy) mean photon numbers."""
        return (self.mu, self.nu, self.vacuum)

    @property
    def intensity_probabilities(self) -> tuple[float, float, float]:
        """A priori probabilities of (signal, weak decoy, vacuum decoy)."""
        return (self.p_mu, self.p_nu, self.p_vacuum)

    @property
    def y0(self) -> float:
        """Vacuum yield: probability that at least one of Bob's two detectors fires in the dark."""
        return self.dark_count_prob * (2.0 - self.dark_count_prob)

    @property
    def bob_station_transmittance(self) -> float:
        """Bob's insertion loss times detector efficiency (the 'eta_Bob' of Ma et al. 2005)."""
        return math.pow(10.0, -self.insertion_loss_db / 10.0) * self.detector_efficiency

    @property
    def fibre_transmittance(self) -> float:
        """Transmittance of the fibre alone, 10^(-alpha L / 10)."""
        return math.pow(10.0, -self.fibre_attenuation_db_per_km * self.length_km / 10.0)

    @property
    def channel_transmittance(self) -> float:
        """Fibre plus insertion loss: what the PLOB bound is evaluated on."""
        return self.fibre_transmittance * math.pow(10.0, -self.insertion_loss_db / 10.0)

    @property
    def transmittance(self) -> float:
        """Overall eta: fibre, insertion loss and detector efficiency."""
        return self.fibre_transmittance * self.bob_station_transmittance

    @property
    def dead_gates(self) -> int:
        """Gates a detector stays blind after a click (non-paralysable)."""
        return math.ceil(self.dead_time_s * self.clock_rate_hz - 1e-9)

    def with_overrides(self, **overrides: Any) -> LinkParameters:
        """A copy with some fields replaced (validated again)."""
        return _replace(self, overrides)


@dataclass(frozen=True)
class SPDCParameters:
    """An entangled-pair (SPDC) source for BBM92.

    Pair numbers per pulse are Poisson with mean ``mean_pairs`` (the multimode limit: each pair
    occupies its own mode and is an independent Bell pair). ``source_position`` is the source's
    distance from Alice as a fraction of the link length (0 = at Alice, 0.5 = midpoint).
    ``chsh_fraction`` is the share of Bob's settings spent on the CHSH angles 22.5 and 67.5 deg.
    """

    mean_pairs: float = 0.05
    pair_statistics: str = "poisson"
    source_position: float = 0.5
    chsh_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not (self.mean_pairs > 0.0 and math.isfinite(self.mean_pairs)):
            raise ParameterError("mean_pairs must be positive")
        if self.pair_statistics != "poisson":
            raise ParameterError("only 'poisson' (multimode) pair statistics are modelled")
        _check_probability("source_position", self.source_position)
        _check_probability("chsh_fraction", self.chsh_fraction, upper=0.999)

    def with_overrides(self, **overrides: Any) -> SPDCParameters:
        """A copy with some fields replaced (validated again)."""
        return _replace(self, overrides)


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str | Path, **overrides: Any) -> LinkParameters:
    """Load the ``[link]`` table of a named preset or a TOML file, with field overrides."""
    table = _read_table(name_or_path, "link", required=True)
    table.update(overrides)
    return _build(LinkParameters, table)


def load_spdc(name_or_path: str | Path, **overrides: Any) -> SPDCParameters:
    """Load the ``[spdc]`` table of a named preset or a TOML file (defaults if absent)."""
    table = _read_table(name_or_path, "spdc", required=False)
    table.update(overrides)
    return _build(SPDCParameters, table)


def _read_table(name_or_path: str | Path, table: str, *, required: bool) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files(PRESET_PACKAGE) / f"{name_or_path}.toml"
        if not resource.is_file():
            raise ParameterError(f"unknown preset {str(name_or_path)!r}; known: {list_presets()}")
        text = resource.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    section = data.get(table)
    if section is None:
        if required:
            raise ParameterError(f"preset has no [{table}] table")
        return {}
    if not isinstance(section, Mapping):
        raise ParameterError(f"[{table}] must be a table")
    return dict(section)


def _build(cls: type[T], table: Mapping[str, Any]) -> T:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - known)
    if unknown:
        raise ParameterError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**table)


def _replace(obj: T, overrides: Mapping[str, Any]) -> T:
    known = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(f"unknown fields: {unknown}")
    return dataclasses.replace(obj, **overrides)  # type: ignore[type-var]


def _check_probability(label: str, value: float, *, upper: float = 1.0, lower_open: bool = False) -> None:
    ok = math.isfinite(value) and value <= upper and (value > 0.0 if lower_open else value >= 0.0)
    if not ok:
        raise ParameterError(f"{label} must lie in {'(' if lower_open else '['}0, {upper}]")
