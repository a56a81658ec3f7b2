"""Copies of adjacent peer KMEs' checkpoint chains, and the countersignatures that answer them.

Anchors (``kms.audit.anchors``) stop someone who can write a KME's database but not its anchor file.
Someone with both — root on the KME's host — could rewrite the records, re-sign nothing, delete the
newest checkpoints and the matching anchor lines, and the KME would find its own history consistent.
So each new checkpoint is also sent to every adjacent peer KME (``audit.checkpoints`` peer message,
``kms.peer.countersign``). The peer checks the origin's signature, checks that the checkpoint
continues the copy it holds (same number sequence, ``prev_hash`` the hash of the last one it holds,
record ranges following on), appends it to ``<anchor dir>/peer-copies/<origin>.anchors.jsonl`` on
*its* host (same format as an anchor file, fsync'd, under a lock), and answers with a receipt signed
by its own ML-DSA key over (origin, countersigner, number, checkpoint hash). A checkpoint that
contradicts the copy — another hash for a number it holds, or a fork from its last one — is refused
and logged at the peer: that is the evidence of a rewrite.

At start a KME asks each reachable peer which of its checkpoints that peer holds
(``audit.held``) and refuses to serve if its database lacks it or holds another
(``kms.server.refuse_unless_peers_agree``, over ``kms.peer.countersign.peer_problems``). Offline, a
peer's copy file is checked like an anchor file: ``qkms audit verify --anchors <copy>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kms.audit.anchors import Anchor, AnchorFile, anchor_path, read_anchors
from kms.domain.audit_chain import Checkpoint, canonical_json

COUNTERSIGN_CONTEXT = b"qkms/audit/countersign/v1"
COPIES_DIR = "peer-copies"

# The origin's public key for a checkpoint whose signature verifies under it, else None.
VerifiedKey = Callable[[Checkpoint], bytes | None]


class CopyConflict(Exception):
    """A checkpoint that contradicts the copy held here: the origin's history was rewritten."""


def copy_file(config_dir: Path, anchor_dir: Path, origin: str) -> AnchorFile:
    """The copy of ``origin``'s chain kept at this KME (a copy starts wherever peering started)."""
    base = anchor_dir if anchor_dir.is_absolute() else config_dir / anchor_dir
    return AnchorFile(anchor_path(base, Path(COPIES_DIR), origin), from_first=False)


def countersign_message(origin: str, countersigner: str, number: int, checkpoint_hash: str) -> bytes:
    """What a countersigning peer signs: it holds ``origin``'s chain up to this checkpoint."""
    return canonical_json(
        {"origin": origin, "countersigner": countersigner, "number": number, "hash": checkpoint_hash}
    )


def accept_checkpoints(
    copy: AnchorFile, origin: str, checkpoints: Sequence[Checkpoint], verified_key: VerifiedKey
) -> Anchor | None:
    """Append the checkpoints that continue the copy; the last one held afterwards.

    Checkpoints the copy already holds must be identical; one past a gap is left for the origin to
    resend after the missing ones. Raises ``CopyConflict`` for a wrong origin, a bad signature, a
    different checkpoint under a number held, or a checkpoint that forks from the last one held."""
    with copy.locked() as book:
        held: dict[int, Anchor] | None = None
        new: list[Anchor] = []
        for cp in sorted(checkpoints, key=lambda c: c.number):
            if cp.kme_id != origin:
                raise CopyConflict(f"checkpoint #{cp.number} names KME {cp.kme_id}, not its sender {origin}")
            key = verified_key(cp)
            if key is None:
                raise CopyConflict(f"checkpoint #{cp.number} of {origin}: the signature does not verify")
            tip = new[-1] if new else book.last
            if tip is not None and cp.number <= tip.number:
                if held is None:
                    held = {a.number: a for a in read_anchors(copy.path, from_first=False)}
                    held.update((a.number, a) for a in new)
                known = held.get(cp.number)
                if known is not None and known.hash != cp.hash():
                    raise CopyConflict(
                        f"checkpoint #{cp.number} of {origin} differs from the copy held here since"
                        f" {known.at}: its audit history was rewritten"
                    )
                continue
            if tip is not None and cp.number > tip.number + 1:
                break  # a gap: the origin resends from the last one held
            if tip is not None and (cp.prev_hash != tip.hash or cp.from_seq != tip.upto_seq + 1):
                raise CopyConflict(
                    f"checkpoint #{cp.number} of {origin} does not continue checkpoint #{tip.number}"
                    " held here: its audit history forked"
                )
            new.append(Anchor.of(cp, key))
        book.append(new)
        return book.last


def last_held(copy: AnchorFile) -> Anchor | None:
    """The newest checkpoint of the origin held here (None before the first)."""
    if not copy.exists():
        return None
    with copy.locked() as book:
        return book.last
