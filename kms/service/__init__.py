"""The application services: one per use case, each one unit of work (docs/DECISIONS.md D-13).

A use case opens its transaction (or hands its database work to the group commit), applies the pure
domain rules (``kms.domain``), calls the repositories (``kms.storage``) and appends its audit records
through the one recorder (``audit_recorder``). The API, the hot path, the CLI, the peer endpoint and
the background jobs call these, never a repository or ``Database.write`` directly.

- ``get_keys``, ``get_keys_with_ids``, ``status``, ``expiry``: key delivery (ETSI GS QKD 014), wired
  together by ``delivery.KeyDeliveryService``; ``gateway`` is the event loop's entry to them
- ``group_commit``, ``batcher``: units of concurrent requests committed together (D-17)
- ``hybrid_keys``: ML-KEM encapsulation and hybrid / fallback key derivation (D-4)
- ``ingest``: key blocks into the pool, link alarms; ``identity_keys``: the KME's PQC key versions
- ``peer_ledger``, ``peer_records``, ``peer_relay``, ``peer_mirror``, ``peer_sweep``: the units of the
  KME-to-KME protocol (``kms.peer`` sends and receives the messages and calls these; D-2, D-20)
- ``links``: an operator suspends or resumes a link; ``registry``: the configured SAEs and links
- ``audit_checkpoints`` (sign and anchor), ``audit_startup`` (the check before serving),
  ``audit_queries`` (the auditor's reads, verification, export), ``audit_countersign`` (peer receipts
  and conflicts): the audit's use cases over the pure checks of ``kms.audit`` (D-8, D-15)
- ``audit_recorder``: the one place audit records are appended
"""
