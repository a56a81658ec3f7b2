"""Shared fixtures for the simulated-link physics tests."""

from __future__ import annotations

import numpy as np
import pytest

from qkd_adapters.sim.params import LinkParameters, load_preset


@pytest.fixture
def gys_ghz() -> LinkParameters:
    """The GYS link at a 1 GHz clock, 25 km."""
    return load_preset("gys", clock_rate_hz=1e9, length_km=25.0)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test is reproducible."""
    return np.random.default_rng(20240601)
