"""The client side's record of a chaos run: which SAE was given which key, as SHA-256 digests (never
the material), and the promises checked over it once the run is over.

A slave fetch whose answer was lost (the connection died, or the KME answered 503 while its database
connection broke mid-commit) may have been committed: such a batch is *uncertain*. If a retry of an
uncertain batch is then refused with 400 "key is consumed", the keys are an accounted-for loss — the
KME consumed them, the slave never saw them. A KME that promises redelivery (``pool.redelivery_seconds``
> 0: the same slave asking again within the window gets the same keys) must have none.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

# The reasons a KME gives (400 details) for a key that is gone because it was served.
SERVED_REASONS = frozenset({"key is consumed", "already delivered to this SAE"})


def digest(key_b64: str) -> str:
    """SHA-256 of a key's bytes: what the ledger keeps and compares instead of the key."""
    return hashlib.sha256(base64.b64decode(key_b64)).hexdigest()


def etsi_error_problem(resp: httpx.Response) -> str | None:
    """Why ``resp`` is not an ETSI GS QKD 014 Error body (None when it is one)."""
    if resp.status_code not in (400, 401, 503):
        return f"status {resp.status_code} is not an ETSI error status"
    if "traceback" in resp.text.lower():
        return f"{resp.status_code} body carries a stack trace"
    try:
        body = resp.json()
    except ValueError:
        return f"{resp.status_code} body is not JSON ({resp.headers.get('content-type')})"
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        return f"{resp.status_code} body has no message string"
    if "details" in body and not isinstance(body["details"], list):
        return f"{resp.status_code} details is not a list"
    return None


@dataclass(frozen=True)
class Pair:
    """A master SAE and the slave it sends its key_IDs to (out of band)."""

    master: str
    slave: str


@dataclass
class Batch:
    """The keys of one Get key answer, on their way to the slave."""

    number: int
    pair: Pair
    key_ids: tuple[str, ...]
    uncertain: str | None = None  # why a fetch of it may have been committed unanswered


@dataclass
class Ledger:
    """Thread-safe record of one run; ``failures()`` lists every broken promise."""

    seed: int
    ambiguous_503: bool = False  # a 503 to dec_keys may hide a commit (database lost mid-commit)
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    issued: dict[str, tuple[Pair, str]] = field(default_factory=dict)
    receipts: list[tuple[str, str, str]] = field(default_factory=list)  # (sae, key_ID, digest)
    pending: dict[int, Batch] = field(default_factory=dict)
    losses: dict[str, str] = field(default_factory=dict)  # key_ID -> why the fetch was uncertain
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _numbers: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def issue(self, pair: Pair, keys: list[dict[str, Any]]) -> Batch:
        """The master's Get key answer: remember each key's digest, await the slave's fetch."""
        with self._lock:
            self.counts["enc 200"] += 1
            batch = Batch(next(self._numbers), pair, tuple(k["key_ID"] for k in keys))
            for k in keys:
                d = digest(k["key"])
                if k["key_ID"] in self.issued:
                    self.problems.append(f"key_ID {k['key_ID']} issued to a master twice")
                self.issued[k["key_ID"]] = (pair, d)
                self.receipts.append((pair.master, k["key_ID"], d))
            self.pending[batch.number] = batch
            return batch

    def fetched(self, batch: Batch, keys: list[dict[str, Any]]) -> None:
        """The slave's 200: the same key_IDs, each with the master's bytes."""
        with self._lock:
            self.counts["dec 200"] += 1
            got = {k["key_ID"]: digest(k["key"]) for k in keys}
            if set(got) != set(batch.key_ids):
                self.problems.append(f"dec_keys answered other key_IDs than asked (batch {batch.number})")
            for key_id, d in got.items():
                self.receipts.append((batch.pair.slave, key_id, d))
                if key_id in self.issued and self.issued[key_id][1] != d:
                    self.problems.append(f"key {key_id}: the slave's bytes differ from the master's")
            self.pending.pop(batch.number, None)

    def uncertain(self, batch: Batch, why: str) -> None:
        with self._lock:
            self.counts[f"dec {why}"] += 1
            batch.uncertain = batch.uncertain or why

    def refused(self, batch: Batch, resp: httpx.Response) -> None:
        """A definite refusal of a slave fetch: an accounted-for loss only if the batch was uncertain
        and every key is refused as already served; anything else breaks a promise."""
        bad = etsi_error_problem(resp)
        details = (resp.json().get("details") or []) if bad is None else []
        reasons = {d.get("key_ID"): d.get("reason") for d in details if isinstance(d, dict)}
        served = set(reasons) == set(batch.key_ids) and set(reasons.values()) <= SERVED_REASONS
        with self._lock:
            self.counts[f"dec {resp.status_code}"] += 1
            self.pending.pop(batch.number, None)
            if bad is None and resp.status_code == 400 and served and batch.uncertain is not None:
                for key_id in batch.key_ids:
                    self.losses[key_id] = batch.uncertain
                return
            state = f"after an uncertain fetch ({batch.uncertain})" if batch.uncertain else "on first fetch"
            self.problems.append(
                f"slave {batch.pair.slave} refused {len(batch.key_ids)} key(s) of batch {batch.number}"
                f" {state}: {resp.status_code} {bad or resp.json().get('message')!r} reasons={sorted(map(str, reasons.values()))}"
            )

    def failures(self, redelivery_seconds: float) -> list[str]:
        """Every broken promise of the run (empty when all held)."""
        with self._lock:
            out = [f"seed {self.seed}: {p}" for p in self.problems]
            for batch in self.pending.values():
                out.append(f"batch {batch.number} ({len(batch.key_ids)} keys) never settled at the slave")
            keys_of: dict[str, set[str]] = defaultdict(set)
            takers: dict[str, set[str]] = defaultdict(set)
            master_copies: Counter[str] = Counter()
            for sae, key_id, d in self.receipts:
                keys_of[d].add(key_id)
                takers[key_id].add(sae)
                master_copies[key_id] += sae == self.issued[key_id][0].master if key_id in self.issued else 0
            out += [
                f"one key's bytes were served as {len(ids)} key_IDs: "
                + ", ".join(f"{k} to {sorted(takers[k])}" for k in sorted(ids))
                for ids in keys_of.values()
                if len(ids) > 1
            ]
            for key_id, saes in takers.items():
                pair = self.issued[key_id][0] if key_id in self.issued else None
                if pair is None or not saes <= {pair.master, pair.slave}:
                    out.append(f"key {key_id} went to {sorted(saes)}, not only its master and slave")
            out += [f"key {k} given to its master {n} times" for k, n in master_copies.items() if n > 1]
            slave_keys = {
                k for sae, k, _ in self.receipts if k in self.issued and sae == self.issued[k][0].slave
            }
            unaccounted = set(self.issued) - slave_keys - set(self.losses)
            if unaccounted:
                out.append(
                    f"{len(unaccounted)} keys the masters received are neither fetched nor accounted for"
                )
            if redelivery_seconds > 0 and self.losses:
                out.append(
                    f"{len(self.losses)} keys lost to in-flight fetches although the KME promises redelivery"
                    f" for {redelivery_seconds:g} s"
                )
            return out

    def summary(self, kills: Counter[str]) -> str:
        with self._lock:
            slave_keys = {
                k for sae, k, _ in self.receipts if k in self.issued and sae == self.issued[k][0].slave
            }
            requests = sum(n for what, n in self.counts.items() if what.startswith(("enc", "dec")))
            return (
                f"seed={self.seed} kills={dict(kills)} requests={requests} {dict(sorted(self.counts.items()))}"
                f" keys_checked={len(slave_keys)} of {len(self.issued)} accounted_losses={len(self.losses)}"
            )
