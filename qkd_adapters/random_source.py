"""A classical test source: CSPRNG bytes standing in for a link until a real one is configured.

Its provenance says exactly what it is: ``is_qkd=False``, protocol ``csprng-test-source``. It exists
so that the KME can be exercised without any physics; nothing it yields is quantum key.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from qkd_adapters.keyblock import KeyBlock, LinkEvent, Provenance


class RandomTestSource:
    """Yields blocks of ``block_bits`` random bits, at most ``rate_bps`` bits per second (None = unpaced)."""

    def __init__(self, link_id: str, block_bits: int = 65536, rate_bps: float | None = None) -> None:
        if block_bits <= 0 or block_bits % 8:
            raise ValueError("block_bits must be a positive multiple of 8")
        self._link_id = link_id
        self._block_bits = block_bits
        self._rate_bps = rate_bps
        self._closed = threading.Event()
        self._counter = 0

    @property
    def link_id(self) -> str:
        return self._link_id

    def describe(self) -> Mapping[str, Any]:
        return {
            "adapter": "random-test-source",
            "protocol": "csprng-test-source",
            "is_qkd": False,
            "block_bits": self._block_bits,
            "rate_bps": self._rate_bps,
        }

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]:
        if self._closed.is_set():
            return []
        count = max_events
        if self._rate_bps:
            wait = self._block_bits / self._rate_bps
            if self._closed.wait(min(wait, timeout) if timeout else wait):
                return []
            count = 1
        blocks: list[LinkEvent] = []
        for _ in range(count):
            self._counter += 1
            blocks.append(
                KeyBlock(
                    link_id=self._link_id,
                    block_id=f"rnd-{uuid.uuid4()}",
                    material=os.urandom(self._block_bits // 8),
                    bit_length=self._block_bits,
                    provenance=Provenance(
                        protocol="csprng-test-source",
                        is_qkd=False,
                        adapter="random-test-source",
                        details={"note": "operating-system CSPRNG; not quantum key distribution"},
                    ),
                )
            )
        return blocks

    def close(self) -> None:
        self._closed.set()
