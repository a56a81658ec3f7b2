"""Key IDs: time-ordered UUIDs (RFC 9562 version 7).

ETSI GS QKD 014 only asks for a UUID. Version 7 puts the creation time (Unix milliseconds) in the
first 48 bits and 74 random bits after it, so new keys land at the right edge of the ``keys``
primary-key index instead of on a random page: a 128-key request dirties a handful of pages instead
of ~128, which is most of a batched request's database cost. What the order reveals — when a key
was reserved, to the millisecond — is already in the key's record and its audit entry; the random
part keeps key IDs unguessable (a guessed ID would still get 401 unless the caller is its slave).

Keys cut together from one block get the IDs of a *run* (:func:`new_key_id_run`): one timestamp and
one random ``rand_b`` for the run, and ``rand_a`` (12 bits) a counter from 0, RFC 9562 section 6.2
method 1 ("fixed-length dedicated counter bits"). The run is stored as one ``keys`` row under its
first ID (:func:`run_base` of any member), so a 128-key request writes one row, not 128; what the
counter reveals (a key's position in its request) is in its audit record anyway.
"""

from __future__ import annotations

import os
import re
import time
import uuid

# Byte maps that overwrite the version nibble (7) and the variant bits (0b10) of a random byte.
_SET_VERSION = bytes(0x70 | (b & 0x0F) for b in range(256))
_SET_VARIANT = bytes(0x80 | (b & 0x3F) for b in range(256))
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def new_key_id() -> str:
    """A fresh UUIDv7 in canonical text form."""
    return new_key_ids(1)[0]


def new_key_ids(count: int) -> list[str]:
    """``count`` fresh UUIDv7s from one read of the OS random source (this is the delivery hot path:
    a 128-key request would otherwise make 128 ``getrandom`` calls and 128 big-integer UUIDs)."""
    stamp = f"{(time.time_ns() // 1_000_000) & ((1 << 48) - 1):012x}"
    prefix = f"{stamp[:8]}-{stamp[8:]}-"
    rand = bytearray(os.urandom(10 * count))  # per ID: rand_a (12 bits) then rand_b (62 bits)
    rand[0::10] = rand[0::10].translate(_SET_VERSION)
    rand[2::10] = rand[2::10].translate(_SET_VARIANT)
    h = rand.hex()
    return [
        f"{prefix}{h[i : i + 4]}-{h[i + 4 : i + 8]}-{h[i + 8 : i + 20]}" for i in range(0, 20 * count, 20)
    ]


# rand_a: the three hex digits after "xxxxxxxx-xxxx-7" in the canonical text.
_COUNTER = slice(15, 18)
RUN_MAX = 1 << 12


def new_key_id_run(count: int) -> list[str]:
    """``count`` (1..4096) UUIDv7s of one run: member ``i`` carries ``i`` in its ``rand_a`` bits."""
    if not 0 < count <= RUN_MAX:
        raise ValueError(f"a key ID run holds 1 to {RUN_MAX} IDs")
    base = new_key_ids(1)[0]
    head, tail = base[: _COUNTER.start], base[_COUNTER.stop :]
    return [f"{head}{i:03x}{tail}" for i in range(count)]


def run_base(key_id: str) -> str:
    """The first ID of the run ``key_id`` would belong to (its counter set to 0)."""
    return f"{key_id[: _COUNTER.start]}000{key_id[_COUNTER.stop :]}"


def run_index(key_id: str) -> int:
    """``key_id``'s position in its run, if it belongs to one (canonical IDs only)."""
    return int(key_id[_COUNTER], 16)


def run_member(base: str, index: int) -> str:
    """Member ``index`` of the run whose first ID is ``base``."""
    return f"{base[: _COUNTER.start]}{index:03x}{base[_COUNTER.stop :]}"


def canonical_key_id(value: object) -> str | None:
    """``value`` as a canonical (lower-case, hyphenated) UUID string, or None if it is not a UUID."""
    if isinstance(value, str) and _CANONICAL.fullmatch(value):
        return value
    try:
        return str(uuid.UUID(value))  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None
