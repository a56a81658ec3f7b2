"""Peer countersigning of audit checkpoints: push ours to adjacent peers, keep copies of theirs.

The protocol and what it protects against are in ``kms.audit.peer_copies`` and docs/SECURITY.md
("Audit anchors and peer copies"). Two peer messages:

- ``audit.checkpoints`` ``{"checkpoints": [...]}``: the origin's checkpoints after the last one the
  peer acknowledged (the newest one alone when it does not know). The peer appends what continues
  its copy and answers ``{"held", "hash", "upto_seq", "countersignature", "key_version",
  "algorithm"}``; a checkpoint contradicting its copy is refused (and audited there).
- ``audit.held`` ``{}``: the peer answers which of the origin's checkpoints it holds last.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from kms.audit.anchors import Anchor
from kms.audit.peer_copies import (
    COUNTERSIGN_CONTEXT,
    CopyConflict,
    accept_checkpoints,
    copy_file,
    countersign_message,
    last_held,
)
from kms.crypto.identity import KmeIdentity
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.domain.audit_chain import Checkpoint, Receipt, checkpoint_from_json
from kms.domain.errors import PeerRequestRefused
from kms.peer.client import PeerClient, PeerError, PeerRefused
from kms.peer.directory import PeerDirectory
from kms.peer.messages import MessageRejected, PeerMessage
from kms.service import audit_countersign, peer_context
from kms.storage.database import Database

log = structlog.get_logger(__name__)
BATCH = 64  # checkpoints per message (a checkpoint is about 5 KB with its ML-DSA-65 signature)
MAX_ROUNDS = 50  # messages per peer per push: a long-absent peer catches up over several pushes


@dataclass(frozen=True)
class PeerAudit:
    """What this KME needs to keep peer copies and to check its own audit against theirs."""

    kme_id: str
    db: Database
    identity: KmeIdentity
    directory: PeerDirectory
    config_dir: Path
    anchor_dir: Path


class CopyKeeper:
    """The receiving side: keeps adjacent peers' checkpoint chains and countersigns them."""

    def __init__(self, ctx: PeerAudit) -> None:
        self.ctx = ctx

    def handlers(self) -> dict[str, Callable[[PeerMessage], dict[str, Any]]]:
        return {"audit.checkpoints": self.on_checkpoints, "audit.held": self.on_held}

    def on_checkpoints(self, message: PeerMessage) -> dict[str, Any]:
        self._remember(message)
        raw = message.body["checkpoints"]
        if not isinstance(raw, list) or not 0 < len(raw) <= BATCH:
            raise MessageRejected(f"audit.checkpoints carries 1 to {BATCH} checkpoints")
        checkpoints = [checkpoint_from_json(c) for c in raw]
        chained = [c for c in checkpoints if isinstance(c, Checkpoint)]
        if len(chained) != len(checkpoints):
            raise MessageRejected("audit.checkpoints carries only chained checkpoints")
        copy = self._copy(message.sender)
        try:
            held = accept_checkpoints(copy, message.sender, chained, self._verified_key(message.sender))
        except CopyConflict as exc:
            self._record_conflict(message.sender, str(exc))
            raise MessageRejected(f"audit copy conflict: {exc}") from None
        return self._receipt(message.sender, held)

    def on_held(self, message: PeerMessage) -> dict[str, Any]:
        self._remember(message)
        return self._receipt(message.sender, last_held(self._copy(message.sender)))

    def _copy(self, origin: str) -> Any:
        if self.ctx.directory.get(origin) is None:
            raise MessageRejected(f"KME {origin} is not a configured peer")
        return copy_file(self.ctx.config_dir, self.ctx.anchor_dir, origin)

    def _verified_key(self, origin: str) -> Callable[[Checkpoint], bytes | None]:
        def verified(cp: Checkpoint) -> bytes | None:
            key = self.ctx.directory.sign_key(origin, cp.key_version)
            if key is None or key.algorithm != cp.algorithm:
                return None
            try:
                signature = bytes.fromhex(cp.signature)
            except ValueError:
                return None
            ok = self.ctx.identity.signer.verify(
                SignatureAlgorithm(cp.algorithm), key.public_key, cp.message(), signature, cp.context
            )
            return key.public_key if ok else None

        return verified

    def _receipt(self, origin: str, held: Anchor | None) -> dict[str, Any]:
        if held is None:
            return {"held": 0}
        message = countersign_message(origin, self.ctx.kme_id, held.number, held.hash)
        version, algorithm, signature = self.ctx.identity.sign(message, COUNTERSIGN_CONTEXT)
        return {
            "held": held.number,
            "hash": held.hash,
            "upto_seq": held.upto_seq,
            "countersignature": signature.hex(),
            "key_version": version,
            "algorithm": algorithm,
        }

    def _remember(self, message: PeerMessage) -> None:
        try:
            peer_context.remember_alone(self.ctx.db, message)
        except PeerRequestRefused as exc:  # a replay
            raise MessageRejected(exc.reason) from None

    def _record_conflict(self, origin: str, problem: str) -> None:
        log.error("audit_peer_copy_conflict", peer=origin, problem=problem)
        audit_countersign.record_copy_conflict(self.ctx.db, origin, problem)


class Countersigner:
    """The sending side: pushes this KME's new checkpoints to every adjacent peer and stores the
    receipts. Any process of the KME may push (the peers' copies are idempotent)."""

    def __init__(self, ctx: PeerAudit, client: PeerClient) -> None:
        self.ctx = ctx
        self.client = client
        self._acked: dict[str, int] = {}
        self._lock = threading.Lock()

    def push(self) -> int:
        """Send what each reachable peer lacks; the number of new receipts stored."""
        stored = 0
        with self._lock:
            for peer in self.ctx.directory.adjacent():
                try:
                    stored += self._push_to(peer.kme_id)
                except PeerRefused as exc:
                    log.error("audit_countersign_refused", peer=peer.kme_id, reason=exc.reason)
                except PeerError as exc:
                    log.info("audit_countersign_deferred", peer=peer.kme_id, reason=exc.reason)
        return stored

    def _push_to(self, peer_id: str) -> int:
        stored = 0
        for _ in range(MAX_ROUNDS):
            acked = self._acked.get(peer_id)
            batch = audit_countersign.checkpoints_to_push(self.ctx.db, acked, BATCH)
            if not batch:
                return stored
            reply = self.client.call(
                peer_id, "audit.checkpoints", {"checkpoints": [c.to_json() for c in batch]}
            )
            held = self._check_receipt(peer_id, reply.body)
            if held is not None and audit_countersign.store_receipt(self.ctx.db, peer_id, held):
                stored += 1
            number = held.number if held is not None else 0
            if acked is not None and number <= acked:
                return stored  # no progress: the peer holds nothing newer it could take
            self._acked[peer_id] = number
        return stored

    def _check_receipt(self, peer_id: str, body: dict[str, Any]) -> Receipt | None:
        number = int(body["held"])
        if number == 0:
            return None
        checkpoint_hash, version = str(body["hash"]), int(body["key_version"])
        key = self.ctx.directory.sign_key(peer_id, version)
        if key is None:
            raise PeerRefused(peer_id, "its countersignature does not verify")
        receipt = Receipt(
            peer_id,
            number,
            checkpoint_hash,
            version,
            key.algorithm,
            str(body["countersignature"]),
            datetime.now(UTC),
        )
        if not countersignature_valid(self.ctx, receipt):
            raise PeerRefused(peer_id, "its countersignature does not verify")
        return receipt


def countersignature_valid(ctx: PeerAudit, r: Receipt) -> bool:
    """Whether ``r`` is the peer's signature (its key ``r.key_version``, as its bundle says) over
    holding this KME's chain up to checkpoint ``r.number`` with hash ``r.checkpoint_hash``."""
    key = ctx.directory.sign_key(r.peer, r.key_version)
    if key is None or key.algorithm != r.algorithm:
        return False
    try:
        signature = bytes.fromhex(r.signature)
    except ValueError:
        return False
    message = countersign_message(ctx.kme_id, r.peer, r.number, r.checkpoint_hash)
    return ctx.identity.signer.verify(
        SignatureAlgorithm(r.algorithm), key.public_key, message, signature, COUNTERSIGN_CONTEXT
    )


def peer_problems(ctx: PeerAudit, client: PeerClient) -> tuple[list[str], list[str]]:
    """Ask each adjacent peer what it holds of our chain: (problems, peers not reachable)."""
    problems: list[str] = []
    unreachable: list[str] = []
    for peer in ctx.directory.adjacent():
        try:
            body = client.call(peer.kme_id, "audit.held", {}).body
        except PeerError as exc:
            unreachable.append(f"{peer.kme_id} ({exc.reason})")
            continue
        number = int(body.get("held", 0))
        if number == 0:
            continue
        ours = audit_countersign.checkpoint(ctx.db, number)
        where = f"KME {peer.kme_id} holds a copy of checkpoint #{number} (seq ..{body.get('upto_seq')})"
        if ours is None:
            problems.append(f"{where}, which this database lacks (deleted)")
        elif ours.hash() != body.get("hash"):
            problems.append(f"{where}, which differs from this database's (rewritten)")
    return problems, unreachable


def receipt_report(ctx: PeerAudit) -> tuple[list[str], list[str]]:
    """The newest receipt of each peer, checked: (one line per peer, problems). A receipt whose
    signature fails, or whose checkpoint this database lacks or holds differently, is a problem."""
    lines: list[str] = []
    problems: list[str] = []
    latest, ours = audit_countersign.latest_receipts(ctx.db)
    for r in latest:
        mine = ours.get(r.number)
        name = f"KME {r.peer}'s countersignature of checkpoint #{r.number}"
        if not countersignature_valid(ctx, r):
            problems.append(f"{name} does not verify (forged, or the peer's key is unknown)")
        elif mine is None:
            problems.append(f"{name}: the database lacks that checkpoint (deleted)")
        elif mine.hash() != r.checkpoint_hash:
            problems.append(f"{name}: the database's checkpoint differs (rewritten)")
        else:
            lines.append(
                f"{r.peer} holds a copy up to checkpoint #{r.number} (countersigned {r.at:%Y-%m-%d %H:%M:%S})"
            )
    return lines, problems
