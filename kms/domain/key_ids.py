"""Key IDs: time-ordered UUIDs (RFC 9562 version 7).

ETSI GS QKD 014 only asks for a UUID. Version 7 puts the creation time (Unix milliseconds) in the
first 48 bits and 74 random bits after it, so new keys land at the right edge of the ``keys``
primary-key index instead of on a random page: a 128-key request dirties a handful of pages instead
of ~128, which is most of a batched request's database cost. What the order reveals — when a key
was reserved, to the millisecond — is already in the key's record and its audit entry; the random
part keeps key IDs unguessable (a guessed ID would still get 401 unless the caller is its slave).
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62
_RAND_A_MASK = (1 << 12) - 1
_RAND_B_MASK = (1 << 62) - 1


def new_key_id() -> str:
    """A fresh UUIDv7 in canonical text form."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (millis & ((1 << 48) - 1)) << 80
        | _VERSION_7
        | ((rand >> 62) & _RAND_A_MASK) << 64
        | _VARIANT_RFC
        | (rand & _RAND_B_MASK)
    )
    return str(uuid.UUID(int=value))
