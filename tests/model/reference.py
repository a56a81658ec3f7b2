"""An in-memory reference model of one KME's key store, for the model-based tests.

It knows only what the KME promises (docs/ARCHITECTURE.md, "Key store invariants"), written as
plainly as possible: blocks arrive and are split into storage pieces; Get key cuts keys from the
first active piece with room, in arrival order; each key is fetchable exactly once by each of its
slaves, with the master's bytes; a link alarm suspends pieces and reserved keys, a resume brings
them back or destroys them; the expiry sweep closes reserved keys whose TTL passed. Nothing here
imports the KMS, so a bug there cannot hide in a shared helper.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Piece:
    """A storage piece of an arrived block: ``material[next_byte:]`` is still unserved."""

    block_id: str
    source_offset_bits: int
    material: bytes
    next_byte: int = 0
    state: str = "active"  # active, exhausted, suspended, destroyed

    @property
    def remaining_bits(self) -> int:
        return (len(self.material) - self.next_byte) * 8


@dataclass
class Key:
    key_id: str
    material: bytes
    slaves: dict[str, bool]  # slave SAE -> served yet
    block_id: str
    source_bit: int  # the key's first bit within its source block
    state: str = "reserved"  # reserved, consumed, expired, suspended, destroyed
    redeliverable: bool = False  # consumed, inside the redelivery window


@dataclass
class Outcome:
    """What the model expects of a Get key with key IDs."""

    kind: str  # "ok", "not_found", "not_entitled", "unavailable", "redelivered"
    materials: list[bytes] = field(default_factory=list)


@dataclass
class ReferenceStore:
    storage_block_bits: int
    min_key_size: int
    redelivery: bool = False
    pieces: list[Piece] = field(default_factory=list)
    keys: dict[str, Key] = field(default_factory=dict)
    link_suspended: bool = False

    # -- blocks ------------------------------------------------------------------------------
    def add_block(self, block_id: str, material: bytes) -> None:
        step = self.storage_block_bits // 8
        state = "suspended" if self.link_suspended else "active"
        for start in range(0, len(material), step):
            chunk = material[start : start + step]
            if len(chunk) * 8 >= self.min_key_size:
                self.pieces.append(Piece(block_id, start * 8, chunk, state=state))

    # -- Get key -----------------------------------------------------------------------------
    def plan_cut(self, number: int, size_bits: int) -> list[tuple[int, int]] | None:
        """(piece index, byte offset) of each key Get key would cut, or None if the pool is short."""
        if self.link_suspended:
            return None
        size = size_bits // 8
        plan: list[tuple[int, int]] = []
        for index, piece in enumerate(self.pieces):
            if piece.state != "active":
                continue
            fit = (len(piece.material) - piece.next_byte) // size
            for i in range(min(fit, number - len(plan))):
                plan.append((index, piece.next_byte + i * size))
            if len(plan) == number:
                return plan
        return None

    def cut(self, plan: list[tuple[int, int]], size_bits: int) -> list[bytes]:
        size = size_bits // 8
        out = []
        for index, offset in plan:
            piece = self.pieces[index]
            out.append(piece.material[offset : offset + size])
            piece.next_byte = offset + size
            if piece.remaining_bits < self.min_key_size:
                piece.state = "exhausted"
        return out

    def record(self, key_id: str, material: bytes, slaves: list[str], plan_entry: tuple[int, int]) -> None:
        piece = self.pieces[plan_entry[0]]
        self.keys[key_id] = Key(
            key_id,
            material,
            {s: False for s in slaves},
            piece.block_id,
            piece.source_offset_bits + plan_entry[1] * 8,
        )

    def available_keys(self, size_bits: int) -> int:
        """What Get status reports as stored_key_count for ``size_bits``."""
        if self.link_suspended:
            return 0
        return sum(p.remaining_bits // size_bits for p in self.pieces if p.state == "active")

    # -- Get key with key IDs ----------------------------------------------------------------
    def expect_fetch(self, slave: str, key_ids: list[str]) -> Outcome:
        """The outcome, in the order the KME judges it (unknown, not entitled, unavailable)."""
        if any(k not in self.keys for k in key_ids):
            return Outcome("not_found")
        keys = [self.keys[k] for k in key_ids]
        if any(slave not in k.slaves for k in keys):
            return Outcome("not_entitled")
        if all(k.slaves[slave] and self._redeliverable(k) for k in keys):
            return Outcome("redelivered", [k.material for k in keys])
        if any(k.state != "reserved" or k.slaves[slave] for k in keys):
            return Outcome("unavailable")
        return Outcome("ok", [k.material for k in keys])

    def _redeliverable(self, key: Key) -> bool:
        """A slave already served may fetch again: after the last slave inside the window, or a
        multicast key still waiting for other slaves."""
        return (key.state == "consumed" and key.redeliverable) or (
            key.state == "reserved" and self.redelivery
        )

    def fetched(self, slave: str, key_ids: list[str]) -> None:
        for key_id in key_ids:
            key = self.keys[key_id]
            key.slaves[slave] = True
            if all(key.slaves.values()):
                key.state = "consumed"
                key.redeliverable = self.redelivery

    # -- link alarms, expiry -----------------------------------------------------------------
    def suspend(self) -> None:
        self.link_suspended = True
        for piece in self.pieces:
            if piece.state == "active":
                piece.state = "suspended"
        for key in self.keys.values():
            if key.state == "reserved":
                key.state = "suspended"

    def resume(self, discard: bool) -> None:
        self.link_suspended = False
        for piece in self.pieces:
            if piece.state == "suspended":
                piece.state = "destroyed" if discard else "active"
        for key in self.keys.values():
            if key.state == "suspended":
                key.state = "destroyed" if discard else "reserved"

    def expire_all(self) -> None:
        """The sweep, run with a clock past every TTL and every redelivery window."""
        for key in self.keys.values():
            if key.state == "reserved":
                key.state = "expired"
            key.redeliverable = False
