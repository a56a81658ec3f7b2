"""The shipped presets deliver finite key on the short blocks a line-rate link uses (issue 17).

Regression: snspd-modern used to abort 25 ms blocks at 10 km and 0.1 s blocks at 50 km with
"single-photon bound not positive: decoy statistics inconsistent" (or a phase-error bound above
tolerance): too few X-basis weak-decoy events against Lim et al.'s per-intensity Hoeffding
deviation, with the detectors dead two thirds of the time under mu = 0.6 (docs/PHYSICS.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkd_adapters.sim.finite_key import secret_key_length
from qkd_adapters.sim.params import load_preset
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block


def _h2(x: float) -> float:
    return 0.0 if x <= 0.0 or x >= 1.0 else -x * math.log2(x) - (1 - x) * math.log2(1 - x)


@pytest.mark.parametrize(("length_km", "block_s"), [(10.0, 0.025), (50.0, 0.1)])
def test_snspd_modern_gives_key_on_short_blocks(length_km: float, block_s: float) -> None:
    p = load_preset("snspd-modern", length_km=length_km)
    for seed in range(3):
        block = simulate_bb84_block(p, round(block_s * p.clock_rate_hz), np.random.default_rng(seed))
        n = block.alice_key.size
        leak = math.ceil(1.10 * _h2(block.qber_z) * n)  # reconciliation at f = 1.10, the ceiling
        res = secret_key_length(block, leak, p.eps_sec, p.eps_cor)
        assert res.abort_reason is None, res.abort_reason
        assert res.length > 0.05 * n
