"""A classical test source: CSPRNG bytes standing in for a link until a real one is configured.

Its provenance says exactly what it is: ``is_qkd=False``, protocol ``csprng-test-source``. It exists
so that the KME can be exercised without any physics; nothing it yields is quantum key.

With ``shared_seed`` the source stands in for *both* ends of a link between two KMEs in tests and
pilots: each end expands the same seed with AES-256-CTR into the same numbered blocks. Anyone who
knows the seed knows every key, so its provenance says so; it is never a substitute for a device.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qkd_adapters.keyblock import KeyBlock, LinkEvent, Provenance


class RandomTestSource:
    """Yields blocks of ``block_bits`` random bits, at most ``rate_bps`` bits per second (None = unpaced)."""

    def __init__(
        self,
        link_id: str,
        block_bits: int = 65536,
        rate_bps: float | None = None,
        shared_seed: str | None = None,
        start_after: int = 0,
    ) -> None:
        """``start_after``: the highest block number this end already stored (a paired source
        resumes after it on a restart: block k's bits depend only on k, so starting again at 1
        would hand the KME blocks it holds, refused as duplicates until the count passed them)."""
        if block_bits <= 0 or block_bits % 8:
            raise ValueError("block_bits must be a positive multiple of 8")
        self._seed_key = (
            hashlib.sha256(f"qkms/paired-test-source/{link_id}/{shared_seed}".encode()).digest()
            if shared_seed is not None
            else None
        )
        self._link_id = link_id
        self._block_bits = block_bits
        self._rate_bps = rate_bps
        self._closed = threading.Event()
        if start_after < 0:
            raise ValueError("start_after must not be negative")
        self._counter = start_after if shared_seed is not None else 0

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
            "paired": self._seed_key is not None,
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
                    block_id=self._block_id(),
                    material=self._material(),
                    bit_length=self._block_bits,
                    provenance=Provenance(
                        protocol="csprng-test-source",
                        is_qkd=False,
                        adapter="random-test-source",
                        details={"note": self._note()},
                    ),
                )
            )
        return blocks

    def _block_id(self) -> str:
        return f"rnd-{self._counter}" if self._seed_key else f"rnd-{uuid.uuid4()}"

    def _material(self) -> bytes:
        n = self._block_bits // 8
        if self._seed_key is None:
            return os.urandom(n)
        # The block number is the high half of CTR's initial counter block, so each block's keystream
        # starts 2^64 AES blocks after the previous one's: blocks never share bits. (The whole counter
        # block once was the number, making block k+1 block k shifted by 16 bytes: repeated keys.)
        nonce = self._counter.to_bytes(8, "big") + bytes(8)
        encryptor = Cipher(algorithms.AES(self._seed_key), modes.CTR(nonce)).encryptor()
        return encryptor.update(bytes(n)) + encryptor.finalize()

    def _note(self) -> str:
        if self._seed_key is None:
            return "operating-system CSPRNG; not quantum key distribution"
        return "paired test source: both ends expand a shared seed (AES-CTR); not secret, not QKD"

    def close(self) -> None:
        self._closed.set()
