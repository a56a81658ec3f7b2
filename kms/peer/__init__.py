"""KME-to-KME: peer bundles, signed and replay-protected messages, the key ledger, relay and routing.

Two KMEs that share a link hold identical key blocks from their devices; they exchange metadata only
(docs/DECISIONS.md D-2): which blocks both hold, and ledger entries saying which key_IDs were cut from which
bits for which SAEs. Material travels only in trusted-node relay, one-time-pad encrypted per hop.
"""
