"""Key and block lifecycle states and the transitions allowed between them (NIST SP 800-57, DECISIONS.md D-3).

Keys are cut from *active* pool blocks straight into ``reserved`` (the bits' ``active`` phase is the
block's) — or, for a slave at another KME, into ``pre_active`` until that KME records them — and end ``consumed`` (every slave served), ``expired`` (TTL passed unfetched),
``compromised`` or ``destroyed``. Terminal states hold no material.
"""

from __future__ import annotations

from enum import StrEnum


class KeyState(StrEnum):
    PRE_ACTIVE = "pre_active"
    ACTIVE = "active"
    RESERVED = "reserved"
    CONSUMED = "consumed"
    SUSPENDED = "suspended"
    COMPROMISED = "compromised"
    EXPIRED = "expired"
    DESTROYED = "destroyed"
    EXHAUSTED = "exhausted"


ALLOWED: dict[KeyState | None, frozenset[KeyState]] = {
    None: frozenset({KeyState.PRE_ACTIVE}),
    # Blocks: pre_active until the peer KME confirms it holds the same block. Keys for a slave at
    # another KME: pre_active until that KME has recorded them, then consumed here (this KME serves
    # them to no one else), or destroyed (bits discarded) if it did not.
    KeyState.PRE_ACTIVE: frozenset(
        {KeyState.ACTIVE, KeyState.DESTROYED, KeyState.SUSPENDED, KeyState.CONSUMED}
    ),
    KeyState.ACTIVE: frozenset(
        {KeyState.RESERVED, KeyState.SUSPENDED, KeyState.COMPROMISED, KeyState.EXHAUSTED, KeyState.DESTROYED}
    ),
    # reserved -> destroyed: the master's KME withdrew a key recorded here that it never delivered.
    KeyState.RESERVED: frozenset(
        {
            KeyState.RESERVED,
            KeyState.CONSUMED,
            KeyState.EXPIRED,
            KeyState.COMPROMISED,
            KeyState.SUSPENDED,
            KeyState.DESTROYED,
        }
    ),
    KeyState.SUSPENDED: frozenset(
        {KeyState.ACTIVE, KeyState.RESERVED, KeyState.COMPROMISED, KeyState.DESTROYED, KeyState.EXPIRED}
    ),
    KeyState.CONSUMED: frozenset({KeyState.COMPROMISED}),
    KeyState.EXPIRED: frozenset({KeyState.COMPROMISED}),
    KeyState.EXHAUSTED: frozenset({KeyState.COMPROMISED}),
    KeyState.COMPROMISED: frozenset({KeyState.DESTROYED}),
    KeyState.DESTROYED: frozenset(),
}

MATERIAL_FREE = frozenset(
    {KeyState.CONSUMED, KeyState.EXPIRED, KeyState.DESTROYED, KeyState.EXHAUSTED, KeyState.COMPROMISED}
)


class IllegalTransition(RuntimeError):
    """A transition the lifecycle does not allow; a programming error, never user input."""


def check_transition(current: KeyState | None, target: KeyState) -> None:
    if target not in ALLOWED[current]:
        raise IllegalTransition(f"lifecycle does not allow {current} -> {target}")
