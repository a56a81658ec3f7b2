"""KME-to-KME: peer bundles, signed and replay-protected messages, the key ledger, relay and routing.

Two KMEs that share a link hold identical key blocks from their devices; they exchange metadata only
(docs/DECISIONS.md D-2): which blocks both hold, and ledger entries saying which key_IDs were cut from which
bits for which SAEs. Material travels only in trusted-node relay, one-time-pad encrypted per hop.

This package is the protocol (messages, transport, routes, what each message means); every database
change it causes is a unit of work in ``kms.service`` (``peer_ledger``, ``peer_records``,
``peer_relay``, ``peer_mirror``). ``network.PeerNetwork`` holds the pieces and dispatches messages.
"""
