"""Classical post-processing of the simulated QKD link: what a real device's software runs.

Every message between the two ends goes through an authenticated, counted
:class:`~.channel.ClassicalChannel`. The stages: Cascade reconciliation (:mod:`.cascade`),
verification by universal hashing (:mod:`.verification`), privacy amplification by a proven
two-universal family, multiply-add-shift or Toeplitz (:mod:`.privacy_amplification`);
:mod:`qkd_adapters.sim.pipeline` chains them.
"""
