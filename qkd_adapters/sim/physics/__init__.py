"""Physics of the simulated link: sources, fibre, detectors, eavesdroppers, BB84 and BBM92.

Entry points: :func:`.bb84.simulate_bb84_block` and :func:`.bbm92.simulate_bbm92_block`; the
models and why the samplers are exact are described in ``docs/PHYSICS.md``.
"""

from qkd_adapters.sim.physics.bb84 import BB84Block, simulate_bb84_block
from qkd_adapters.sim.physics.bbm92 import BBM92Block, simulate_bbm92_block
from qkd_adapters.sim.physics.counts import DecoyCounts
from qkd_adapters.sim.physics.eve import BeamSplitting, Eavesdropper, InterceptResend, PhotonNumberSplitting

__all__ = [
    "BB84Block",
    "BBM92Block",
    "BeamSplitting",
    "DecoyCounts",
    "Eavesdropper",
    "InterceptResend",
    "PhotonNumberSplitting",
    "simulate_bb84_block",
    "simulate_bbm92_block",
]
