"""The multi-site key ledger's rules (DECISIONS.md D-20): what a ledger entry must name, where a KME
stands on an entry's route, which request a ``keys.cancel`` may void, and the one-time pad under which
a trusted node relays a key. Pure: the units that apply them are in ``kms.service.peer_records``,
``peer_relay`` and ``peer_ledger``; the messages that carry them in ``kms.peer``.

A ledger entry (the body of ``keys.record``, or one entry of ``keys.record.batch``) names the route
(origin first, target last), the hops so far, the key size, for each key_ID the bits of a piece the
sender cut (link, block, offset), the master and slave SAEs, the policy and suite, and for hybrid or
fallback keys the ML-KEM ciphertext for the target KME.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from kms.domain.delivery import KemExchange
from kms.domain.errors import PeerRequestRefused
from kms.domain.keys import CutKey
from kms.domain.saes import SaeRegistry

# Requests that record keys at the peer: the ones a ``keys.cancel`` may void.
LEDGER_REQUESTS = frozenset({"keys.record", "keys.record.batch"})
# Entries of one ``keys.record.batch``.
MAX_BATCH_ENTRIES = 256


def route_position(route: Sequence[str], kme_id: str, sender: str) -> int:
    """This KME's index on ``route``: it must be the next hop after ``sender``."""
    if kme_id not in route[1:] or route[route.index(kme_id) - 1] != sender:
        raise PeerRequestRefused("this KME is not the next hop after the sender on the message's route")
    return route.index(kme_id)


def check_entry(
    registry: SaeRegistry, max_key_per_request: int, b: Mapping[str, Any]
) -> tuple[list[str], list[str], int]:
    """Validate a ledger entry's SAEs and keys: (key_IDs, slaves, size)."""
    route = [str(k) for k in b["route"]]
    origin, target = route[0], route[-1]
    size = int(b["size"])
    if size <= 0 or size % 8 or size > 65536:
        raise PeerRequestRefused("key size must be a positive multiple of 8 bits")
    master_id = str(b["master_SAE_ID"])
    slaves = [str(s) for s in b["slave_SAE_IDs"]]
    master = registry.get(master_id)
    if master is None or master.kme_id != origin:
        raise PeerRequestRefused(f"SAE {master_id} is not served by the route's origin {origin}")
    if not master.enabled:  # its KME reported it suspended or revoked (DECISIONS.md D-39)
        raise PeerRequestRefused(f"SAE {master_id} is {master.state} at {origin}")
    if not slaves:
        raise PeerRequestRefused("a ledger entry names at least one slave")
    for sae_id in slaves:
        info = registry.get(sae_id)
        if info is None or info.kme_id != target or info.role != "sae":
            raise PeerRequestRefused(f"SAE {sae_id} is not served by the route's target {target}")
        if not info.enabled:
            raise PeerRequestRefused(f"SAE {sae_id} is {info.state} at {target}")
    entries = b["keys"]
    if not entries or len(entries) > max_key_per_request:
        raise PeerRequestRefused("a ledger entry names 1 to max_key_per_request keys")
    return [str(uuid.UUID(str(e["key_ID"]))) for e in entries], slaves, size


def voided_request(descriptor: Any) -> tuple[str, str, int, str] | None:
    """(nonce, session, seq, type) of the request a ``keys.cancel`` names, or None if it names none."""
    if descriptor is None:
        return None
    if not isinstance(descriptor, dict):
        raise PeerRequestRefused("keys.cancel: 'message' must name the cancelled request")
    nonce, session, seq = str(descriptor["nonce"]), str(descriptor["session"]), int(descriptor["seq"])
    msg_type = str(descriptor["type"])
    if len(nonce) != 32 or not 0 < len(session) <= 64 or seq < 0 or msg_type not in LEDGER_REQUESTS:
        raise PeerRequestRefused("keys.cancel: 'message' does not name a ledger request")
    return nonce, session, seq, msg_type


def key_refs(key_ids: Sequence[str], cut: Sequence[CutKey]) -> list[dict[str, Any]]:
    """Where each key's bits sit in the block both ends of the link hold: what the peer's ledger needs."""
    return [
        {"key_ID": k, "link_id": c.link_id, "block_id": c.source_block_id, "offset": c.source_bit}
        for k, c in zip(key_ids, cut, strict=True)
    ]


def kem_json(exchange: KemExchange, algorithm: str) -> dict[str, Any]:
    """The ML-KEM part of an entry: the ciphertext and which public key of the target it was made for."""
    return {
        "algorithm": algorithm,
        "key_version": exchange.key_version,
        "public_key_sha384": hashlib.sha384(exchange.public_key).hexdigest(),
        "ciphertext": base64.b64encode(exchange.ciphertext).decode(),
    }


def one_time_pad(a: bytes, b: bytes) -> bytes:
    """``a`` XOR ``b``: a key relayed under as many bits of the next hop's link."""
    if len(a) != len(b):
        raise PeerRequestRefused("one-time pad and key differ in length")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")
