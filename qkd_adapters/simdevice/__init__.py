"""A simulated QKD device pair as its own process, speaking ETSI GS QKD 014 like a vendor's devices.

Real QKD systems sit between two sites as two boxes joined by fibre, and each box hands its keys to
its site's KME over ETSI GS QKD 014 (the KME being the box's SAE). This package stands in for such a
pair so that the upstream adapter (``qkd_adapters.etsi014_upstream``) and multi-site KMEs can be run
and tested end to end: one process simulates the link with full physics
(``qkd_adapters.sim.link.SimulatedLink``) and serves device A and device B on two mTLS ports.

- ``pair``: the two devices' shared key buffer and key-ID ledger (no HTTP).
- ``app``: one FastAPI app per device, the three ETSI 014 endpoints with their own Error bodies.
- ``serve``: the device directory (``device.toml``), TLS contexts and both ports in one process.

It is a device, not part of the KMS: it imports nothing of ``kms`` (an import-linter contract in
pyproject.toml checks it), and the KME reaches it only over HTTPS, through the upstream adapter. What
it shares with the KME lies below both, in ``qkd_adapters``: the TLS-identity protocol
(``qkd_adapters.tls_identity``) and a certificate's pinned identity (``qkd_adapters.certificates``).
The ``qkms sim device`` commands (``kms.cli.device``) make its credentials with the KME's X.509 code
and pass in the ML-DSA authenticator of its classical channel (``kms.crypto.channel_auth``).
"""
