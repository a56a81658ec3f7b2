"""Tamper-evident audit, the pure part: verifying the record and checkpoint chains (``chain``), the
anchor file (``anchors``), what the signer and the start-up check refuse (``integrity``), offline
verification of an export (``verification``) and peers' copies of the checkpoint chain
(``peer_copies``). The records and checkpoints are ``kms.domain.audit_chain``; reading and writing
them is ``kms.service.audit_*``: nothing here imports storage or the services."""
