"""The two simulated devices' key buffer: identical blocks at both ends, cut into keys with key_IDs.

The simulated link yields each block twice: Alice's copy (device A) and Bob's copy (device B), equal
after error correction and privacy amplification. When the SAE at one device asks for keys (Get key,
it is the master), the pair cuts the same bits from both copies: the near copy goes to the master at
once, the far copy waits at the *other* device under the new key_ID until the named slave fetches it
(Get key with key IDs) or its TTL passes. So each device only ever hands out its own end's bits, and
each key_ID's material goes to its entitled SAE once. Both copies are zeroised in the buffer as they
are cut; a waiting copy is zeroised when delivered or expired.

Keys are whole bytes (``size`` a multiple of 8) and never span two blocks; the unusable tail of a
block is zeroised and dropped. The buffer is bounded (``max_stored_bits``): while it is full the pair
stops pulling, and the simulated link stops producing (its own queue is tiny).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from qkd_adapters.keyblock import KeyBlock, KeySourceError, LinkAlarm
from qkd_adapters.sim.link import SimulatedLink

log = structlog.get_logger(__name__)

Site = Literal["A", "B"]
SITES: tuple[Site, Site] = ("A", "B")
NOT_FOUND = "one or more keys specified are not found on KME"


def other(site: Site) -> Site:
    return "B" if site == "A" else "A"


class DeviceRequestError(Exception):
    """A request the device refuses: ``status`` is 400, 401 or 503, as ETSI GS QKD 014 defines them."""

    def __init__(self, status: int, message: str, details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)


@dataclass
class _Block:
    block_id: str
    copies: dict[Site, bytearray]
    next_byte: int = 0

    @property
    def remaining(self) -> int:
        return len(self.copies["A"]) - self.next_byte

    def zeroise(self) -> None:
        for copy in self.copies.values():
            copy[:] = bytes(len(copy))


@dataclass
class _Waiting:
    """A key cut for a master, waiting at the slave's device."""

    master: str
    slave: str
    site: Site
    material: bytearray = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class PairLimits:
    """What Get status reports, and the buffer's bounds. Sizes in bits."""

    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 4096
    max_key_per_request: int = 128
    max_stored_bits: int = 4 * 1024 * 1024
    max_waiting_keys: int = 100_000
    key_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("key_size", "min_key_size", "max_key_size", "max_stored_bits"):
            if getattr(self, name) <= 0 or getattr(self, name) % 8:
                raise ValueError(f"{name} must be a positive multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("sizes must satisfy min_key_size <= key_size <= max_key_size")
        if self.max_key_per_request <= 0 or self.max_waiting_keys <= 0 or self.key_ttl_s <= 0:
            raise ValueError("max_key_per_request, max_waiting_keys and key_ttl_s must be positive")


class DevicePair:
    """Devices A and B over one simulated link; ``clients`` maps each site to its SAE (the KME)."""

    def __init__(
        self,
        link: SimulatedLink,
        clients: Mapping[Site, str],
        limits: PairLimits | None = None,
        device_ids: Mapping[Site, str] | None = None,
    ) -> None:
        if set(clients) != set(SITES) or clients["A"] == clients["B"]:
            raise ValueError("each site needs its own client SAE ID")
        self.link = link
        self.clients: dict[Site, str] = dict(clients)
        self.limits = limits or PairLimits()
        self.device_ids: dict[Site, str] = dict(device_ids or {"A": "SIMDEV-A", "B": "SIMDEV-B"})
        self._ends = {"A": link.end("alice"), "B": link.end("bob")}
        self._blocks: deque[_Block] = deque()
        self._stored_bytes = 0
        self._waiting: dict[str, _Waiting] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.blocks_received = 0
        self.alarms = 0
        self.last_alarm: str | None = None
        self.last_qber: float | None = None
        self.failed: str | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refill, name="simdevice-refill", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.link.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for block in self._blocks:
                block.zeroise()
            self._blocks.clear()
            for waiting in self._waiting.values():
                waiting.material[:] = bytes(len(waiting.material))
            self._waiting.clear()

    # ETSI 014 operations (the caller is already authenticated as ``clients[site]``) --------------
    def status(self, site: Site, caller: str, slave: str) -> dict[str, Any]:
        self._check_peer(site, slave, "slave")
        lim = self.limits
        with self._lock:
            stored = self._count_keys(lim.key_size // 8)
        return {
            "source_KME_ID": self.device_ids[site],
            "target_KME_ID": self.device_ids[other(site)],
            "master_SAE_ID": caller,
            "slave_SAE_ID": slave,
            "key_size": lim.key_size,
            "stored_key_count": stored,
            "max_key_count": max(lim.max_stored_bits // lim.key_size, stored),
            "max_key_per_request": lim.max_key_per_request,
            "max_key_size": lim.max_key_size,
            "min_key_size": lim.min_key_size,
            "max_SAE_ID_count": 0,
            "status_extension": self.describe(),
        }

    def get_keys(
        self, site: Site, caller: str, slave: str, number: int | None, size: int | None
    ) -> list[tuple[str, bytes]]:
        """Get key: ``number`` fresh keys for the master ``caller``; the slave's copies wait at the other device."""
        self._check_peer(site, slave, "slave")
        lim = self.limits
        number = 1 if number is None else number
        size = lim.key_size if size is None else size
        if not 1 <= number <= lim.max_key_per_request:
            raise DeviceRequestError(400, f"number must be between 1 and {lim.max_key_per_request}")
        if size % 8:
            raise DeviceRequestError(400, "size shall be a multiple of 8")
        if not lim.min_key_size <= size <= lim.max_key_size:
            raise DeviceRequestError(
                400, f"size must be between {lim.min_key_size} and {lim.max_key_size} bits"
            )
        nbytes = size // 8
        out: list[tuple[str, bytes]] = []
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            if len(self._waiting) + number > lim.max_waiting_keys:
                raise DeviceRequestError(503, "too many keys are waiting for their slave; retry later")
            if self._count_keys(nbytes) < number:
                raise DeviceRequestError(503, "not enough key material on the device; retry later")
            far = other(site)
            while len(out) < number:
                block = self._blocks[0]
                if block.remaining < nbytes:
                    self._drop_head()
                    continue
                start, end = block.next_byte, block.next_byte + nbytes
                near_bits = bytes(block.copies[site][start:end])
                far_bits = bytearray(block.copies[far][start:end])
                for copy in block.copies.values():
                    copy[start:end] = bytes(nbytes)
                block.next_byte = end
                self._stored_bytes -= nbytes
                key_id = str(uuid.uuid4())
                self._waiting[key_id] = _Waiting(caller, slave, far, far_bits, now + lim.key_ttl_s)
                out.append((key_id, near_bits))
        log.info(
            "keys_cut", device=self.device_ids[site], master=caller, slave=slave, number=number, size=size
        )
        return out

    def get_keys_with_ids(
        self, site: Site, caller: str, master: str, key_ids: Sequence[str]
    ) -> list[tuple[str, bytes]]:
        """Get key with key IDs: the waiting copies of keys cut for ``master`` with ``caller`` as slave."""
        self._check_peer(site, master, "master")
        if not key_ids:
            raise DeviceRequestError(400, "at least one key_ID is required")
        if len(key_ids) > self.limits.max_key_per_request:
            raise DeviceRequestError(400, f"at most {self.limits.max_key_per_request} key_IDs per request")
        if len(set(key_ids)) != len(key_ids):
            raise DeviceRequestError(400, "key_IDs must not repeat")
        with self._lock:
            self._expire(time.monotonic())
            entries = [self._waiting.get(k) for k in key_ids]
            if any(e is None for e in entries):
                raise DeviceRequestError(400, NOT_FOUND)
            for e in entries:
                assert e is not None
                if e.site != site or e.slave != caller or e.master != master:
                    raise DeviceRequestError(
                        401, "the requesting SAE is not the slave of one or more of these keys"
                    )
            out: list[tuple[str, bytes]] = []
            for key_id in key_ids:
                waiting = self._waiting.pop(key_id)
                out.append((key_id, bytes(waiting.material)))
                waiting.material[:] = bytes(len(waiting.material))
        log.info("keys_delivered", device=self.device_ids[site], master=master, slave=caller, number=len(out))
        return out

    def describe(self) -> dict[str, Any]:
        """What the device pair is, for Get status' ``status_extension`` (never material)."""
        d = self.link.describe()
        with self._lock:
            waiting = len(self._waiting)
            stored_bits = self._stored_bytes * 8
        return {
            "simulated": True,
            "adapter": "qkms-simdevice",
            "protocol": d["protocol"],
            "preset": d["preset"],
            "distance_km": d["distance_km"],
            "clock_rate_hz": d["clock_rate_hz"],
            "attack": d["attack"],
            "pacing": d["pacing"],
            "blocks_received": self.blocks_received,
            "alarms": self.alarms,
            "last_alarm": self.last_alarm,
            "last_qber": self.last_qber,
            "stored_bits": stored_bits,
            "keys_waiting_for_slave": waiting,
            "link_failed": self.failed,
        }

    # internals ---------------------------------------------------------------------------------
    def _check_peer(self, site: Site, sae_id: str, role: str) -> None:
        if sae_id != self.clients[other(site)]:
            raise DeviceRequestError(
                400, f"{role} SAE {sae_id[:128]!r} is not the SAE of the device at the other end of this link"
            )

    def _count_keys(self, nbytes: int) -> int:
        return sum(b.remaining // nbytes for b in self._blocks)

    def _drop_head(self) -> None:
        block = self._blocks.popleft()
        self._stored_bytes -= block.remaining
        block.zeroise()

    def _expire(self, now: float) -> int:
        expired = [k for k, w in self._waiting.items() if w.expires_at <= now]
        for key_id in expired:
            waiting = self._waiting.pop(key_id)
            waiting.material[:] = bytes(len(waiting.material))
        if expired:
            log.info("keys_expired", number=len(expired))
        return len(expired)

    def _refill(self) -> None:
        """Pull both ends' blocks in step while the buffer has room; expire waiting keys."""
        cap = self.limits.max_stored_bits // 8
        while not self._stop.is_set():
            with self._lock:
                self._expire(time.monotonic())
                full = self._stored_bytes >= cap
            if full:
                self._stop.wait(0.2)
                continue
            try:
                got_a = self._ends["A"].pull(1, timeout=0.5)
                if not got_a:
                    continue
                got_b: Sequence[KeyBlock | LinkAlarm] = []
                deadline = time.monotonic() + 30
                while not got_b and time.monotonic() < deadline and not self._stop.is_set():
                    got_b = self._ends["B"].pull(1, timeout=0.5)
            except KeySourceError as exc:
                self.failed = str(exc)
                log.error("link_failed", error=str(exc))
                return
            if not got_b:
                continue
            self._accept(got_a[0], got_b[0])

    def _accept(self, ev_a: KeyBlock | LinkAlarm, ev_b: KeyBlock | LinkAlarm) -> None:
        if isinstance(ev_a, LinkAlarm) or isinstance(ev_b, LinkAlarm):
            alarm = ev_a if isinstance(ev_a, LinkAlarm) else ev_b
            assert isinstance(alarm, LinkAlarm)
            self.alarms += 1
            self.last_alarm = alarm.reason
            log.warning("link_alarm", block_id=alarm.block_id, reason=alarm.reason)
            return
        if ev_a.block_id != ev_b.block_id or ev_a.bit_length != ev_b.bit_length:
            self.alarms += 1
            self.last_alarm = "ends-out-of-step"
            log.error("link_ends_out_of_step", block_a=ev_a.block_id, block_b=ev_b.block_id)
            return
        usable = ev_a.bit_length // 8
        block = _Block(
            ev_a.block_id, {"A": bytearray(ev_a.material[:usable]), "B": bytearray(ev_b.material[:usable])}
        )
        with self._lock:
            self._blocks.append(block)
            self._stored_bytes += usable
        self.blocks_received += 1
        self.last_qber = ev_a.provenance.qber
        log.info("block_received", block_id=ev_a.block_id, bits=ev_a.bit_length, qber=ev_a.provenance.qber)
