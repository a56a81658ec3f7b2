"""How adapter key blocks become pool blocks: byte-aligned storage pieces, and which of two KMEs
sharing a link cuts each piece (so that no bit can be reserved by both, docs/DECISIONS.md D-2)."""

from __future__ import annotations

import hashlib

from kms.domain.keys import StoragePiece
from qkd_adapters.keyblock import KeyBlock, LinkAlarm


def split_block(
    block: KeyBlock,
    storage_bits: int,
    min_bits: int,
    kme_id: str | None = None,
    peer_kme_id: str | None = None,
) -> list[StoragePiece]:
    """Cut an adapter block into byte-aligned storage pieces; a tail shorter than ``min_bits`` is dropped.

    For a block shared with another KME, pieces are shared out between the two ends so that each cuts
    keys from its own pieces only and no bit can be reserved by both: a piece belongs to one of the two
    KME IDs (sorted) by the parity of a hash of its block ID and offset — balanced over many pieces,
    even when every block is a single piece. Both ends split identically (same
    ``storage_block_bits``, checked when they confirm blocks), so they agree on every piece's owner.
    """
    usable_bytes = block.bit_length // 8
    step = storage_bits // 8
    shared = kme_id is not None and peer_kme_id is not None and peer_kme_id != kme_id
    pieces = []
    for start in range(0, usable_bytes, step):
        chunk = block.material[start : min(start + step, usable_bytes)]
        if len(chunk) * 8 >= min_bits:
            owner = None
            if shared:
                assert kme_id is not None and peer_kme_id is not None
                cutter = sorted((kme_id, peer_kme_id))[piece_parity(block.block_id, start * 8)]
                owner = None if cutter == kme_id else peer_kme_id
            pieces.append(StoragePiece(block.block_id, start * 8, chunk, owner))
    return pieces


def piece_parity(block_id: str, offset_bits: int) -> int:
    """0 or 1: which of two KMEs (IDs sorted) cuts the piece of ``block_id`` at ``offset_bits``."""
    return hashlib.sha256(f"qkms/piece-owner/{block_id}/{offset_bits}".encode()).digest()[0] & 1


def alarm_code(alarm: LinkAlarm) -> str:
    """The alarm's machine-readable code (``details["code"]``), or its reason text."""
    return str(alarm.details.get("code") or alarm.reason)
