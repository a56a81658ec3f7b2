"""Simulated QKD link: physics, analytic key rates, finite-key bounds (and post-processing).

Nothing here imports :mod:`kms`. The physics half lives in :mod:`.physics`, closed forms in
:mod:`.analytic`, the finite-key bound of Lim et al. (2014) in :mod:`.finite_key`, parameter
presets in :mod:`.params`; see ``docs/PHYSICS.md``.
"""

from qkd_adapters.sim.params import (
    LinkParameters,
    ParameterError,
    SPDCParameters,
    list_presets,
    load_preset,
    load_spdc,
)

__all__ = [
    "LinkParameters",
    "ParameterError",
    "SPDCParameters",
    "list_presets",
    "load_preset",
    "load_spdc",
]
