"""A simulated QKD device pair as its own process, speaking ETSI GS QKD 014 like a vendor's devices.

Real QKD systems sit between two sites as two boxes joined by fibre, and each box hands its keys to
its site's KME over ETSI GS QKD 014 (the KME being the box's SAE). This package stands in for such a
pair so that the upstream adapter (``qkd_adapters.etsi014_upstream``) and multi-site KMEs can be run
and tested end to end: one process simulates the link with full physics
(``qkd_adapters.sim.link.SimulatedLink``) and serves device A and device B on two mTLS ports.

- ``pair``: the two devices' shared key buffer and key-ID ledger (no HTTP).
- ``app``: one FastAPI app per device, the three ETSI 014 endpoints with Error bodies.
- ``serve``: ``qkms sim device init`` (PKI) and ``qkms sim device serve`` (both ports, one process).

It uses ``kms.pki`` for certificates and the API layer's transport pieces (the TLS-identity protocol
and the ETSI Error-body handlers), and nothing of the KME's domain or storage.
"""
