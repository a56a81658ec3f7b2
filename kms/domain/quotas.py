"""Fair shares of the key pool (issue 16 part 4, DECISIONS.md D-30): per-SAE and per-pair rate limits
and caps on what a master holds reserved and unfetched. Pure rules, no I/O: the service feeds them
the clock and the reserved counts it reads.

Rates are token buckets (requests, keys and bits per second), each holding at most ``burst_seconds``
of its rate, so a client may spend a short burst and then the steady rate. A request is admitted only
if every bucket that applies can pay for it; then all of them pay, otherwise none does, so a refused
request costs its SAE nothing. A refusal is a one-line reason for the ETSI 503 Error.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QuotaLimits:
    """The limits one process enforces (0: no limit). Rates are already divided among the KME's
    processes by the caller (each process sees its share of the connections)."""

    sae_requests_per_second: float = 0.0
    sae_keys_per_second: float = 0.0
    sae_bits_per_second: float = 0.0
    pair_requests_per_second: float = 0.0
    pair_keys_per_second: float = 0.0
    pair_bits_per_second: float = 0.0
    burst_seconds: float = 1.0
    max_reserved_keys_per_master: int = 0
    max_reserved_bits_per_master: int = 0  # the pool share, in bits of a link's capacity

    @property
    def any_rate(self) -> bool:
        return any(
            (
                self.sae_requests_per_second,
                self.sae_keys_per_second,
                self.sae_bits_per_second,
                self.pair_requests_per_second,
                self.pair_keys_per_second,
                self.pair_bits_per_second,
            )
        )

    @property
    def any_cap(self) -> bool:
        return bool(self.max_reserved_keys_per_master or self.max_reserved_bits_per_master)


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: ``rule`` names the limit (stable, for aggregating the audit), ``message``
    is the Error's one line."""

    rule: str
    message: str


@dataclass
class FairShareRules:
    """The buckets of one process, per master SAE and per (master, slave) pair."""

    limits: QuotaLimits
    max_buckets: int = 10_000
    _buckets: dict[tuple[str, str, str], TokenBucket] = field(default_factory=dict)

    def admit(
        self, master: str, slave: str, number: int, bits: int, reserved: tuple[int, int], now: float
    ) -> Refusal | None:
        """Admit a Get key request of ``number`` keys (``bits`` in all) by ``master`` for ``slave``,
        given the master's (keys, bits) now reserved and unfetched; None if admitted (and paid for)."""
        lim = self.limits
        held_keys, held_bits = reserved
        if lim.max_reserved_keys_per_master and held_keys + number > lim.max_reserved_keys_per_master:
            return Refusal(
                "reserved keys",
                f"SAE {master} holds {held_keys} keys its slaves have not fetched; at most"
                f" {lim.max_reserved_keys_per_master} may wait (quota): retry once they are fetched",
            )
        if lim.max_reserved_bits_per_master and held_bits + bits > lim.max_reserved_bits_per_master:
            return Refusal(
                "pool share",
                f"SAE {master} would hold more than its share of the key pool"
                f" ({lim.max_reserved_bits_per_master} bits reserved and unfetched; quota): retry later",
            )
        if not lim.any_rate:
            return None
        wanted = [
            ("SAE", master, "requests", lim.sae_requests_per_second, 1.0),
            ("SAE", master, "keys", lim.sae_keys_per_second, float(number)),
            ("SAE", master, "bits", lim.sae_bits_per_second, float(bits)),
            ("pair", f"{master} -> {slave}", "requests", lim.pair_requests_per_second, 1.0),
            ("pair", f"{master} -> {slave}", "keys", lim.pair_keys_per_second, float(number)),
            ("pair", f"{master} -> {slave}", "bits", lim.pair_bits_per_second, float(bits)),
        ]
        paying = []
        for scope, who, unit, rate, cost in wanted:
            if not rate:
                continue
            bucket = self._bucket((scope, who, unit), rate, now)
            if cost > bucket.capacity:
                return Refusal(
                    f"{scope} {unit}/s",
                    f"{scope} {who} may take at most {bucket.capacity:g} {unit} at once"
                    f" ({rate:g} {unit}/s per process; quota): ask for fewer",
                )
            bucket.refill(now)
            if bucket.tokens < cost:
                return Refusal(
                    f"{scope} {unit}/s",
                    f"{scope} {who} is over its rate of {rate:g} {unit}/s per process (quota): retry later",
                )
            paying.append((bucket, cost))
        for bucket, cost in paying:
            bucket.tokens -= cost
        return None

    def _bucket(self, key: tuple[str, str, str], rate: float, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._forget_full(now)
            capacity = max(rate * self.limits.burst_seconds, 1.0)
            bucket = self._buckets[key] = TokenBucket(rate, capacity, capacity, now)
        return bucket

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (forgetting them changes nothing), to bound the memory."""
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self._buckets[key]
