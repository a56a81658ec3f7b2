"""Load for chaos runs: per master/slave pair, one thread that asks the master's KME for keys
(``enc_keys``) and has the slave fetch them by key_ID (``dec_keys``) at its KME, over real mTLS,
retrying whatever a kill interrupted, until told to stop. Every loop is bounded in count and time."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kms.lab.launcher import client_ssl_context
from kms.provision.workdir import sae_credential_paths
from tests.chaos.ledger import Batch, Ledger, Pair, etsi_error_problem

# Errors raised before the request reached the server: nothing can have been committed.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
RETRY_PAUSE = 0.05  # between attempts while a server is down: a bound on busy-looping, not a timing


@dataclass(frozen=True)
class Endpoint:
    """Where an SAE calls its KME, with its credentials."""

    base_url: str
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, base_url: str, workdir: Path, sae_id: str) -> Endpoint:
        """An SAE made by ``qkms init`` in ``workdir``, calling the KME at ``base_url``."""
        return cls(base_url, workdir / "pki" / "ca.pem", *sae_credential_paths(workdir, sae_id))

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, verify=client_ssl_context(self.ca, self.cert, self.key), timeout=15.0
        )


@dataclass(frozen=True)
class Route:
    """A pair and where each of its SAEs calls."""

    pair: Pair
    master_at: Endpoint
    slave_at: Endpoint


def fetch_once(client: httpx.Client, ledger: Ledger, batch: Batch) -> bool:
    """One dec_keys attempt for ``batch``; True once its outcome is settled (served or refused)."""
    body = {"key_IDs": [{"key_ID": k} for k in batch.key_ids]}
    try:
        resp = client.post(f"/api/v1/keys/{batch.pair.master}/dec_keys", json=body)
    except NOT_SENT:
        ledger.count("dec not sent")
        return False
    except httpx.TransportError as exc:
        ledger.uncertain(batch, type(exc).__name__)
        return False
    if resp.status_code == 200:
        ledger.fetched(batch, resp.json()["keys"])
        return True
    if resp.status_code == 503:
        bad = etsi_error_problem(resp)
        if bad:
            ledger.problem(f"dec_keys: {bad}")
        if ledger.ambiguous_503:
            ledger.uncertain(batch, "503")
        else:
            ledger.count("dec 503")
        return False
    ledger.refused(batch, resp)
    return True


class LoadThread(threading.Thread):
    """One pair's traffic: Get key (1-4 keys), then Get key with key IDs until settled."""

    def __init__(
        self,
        route: Route,
        ledger: Ledger,
        rng: random.Random,
        stop: threading.Event,
        *,
        max_requests: int = 4000,
        max_seconds: float = 120.0,
    ) -> None:
        super().__init__(name=f"chaos-{route.pair.master}", daemon=True)
        self.route, self.ledger, self.rng, self.stop_event = route, ledger, rng, stop
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds

    def _running(self, requests: int) -> bool:
        return (
            not self.stop_event.is_set() and requests < self.max_requests and time.monotonic() < self.deadline
        )

    def run(self) -> None:
        try:
            with self.route.master_at.client() as master, self.route.slave_at.client() as slave:
                requests = 0
                while self._running(requests):
                    requests += 1
                    batch = self._get_keys(master)
                    while batch is not None and self._running(requests):
                        requests += 1
                        if fetch_once(slave, self.ledger, batch):
                            break
                        time.sleep(RETRY_PAUSE)
        except Exception as exc:  # a crash of the load itself must fail the test, not vanish
            self.ledger.problem(f"load thread {self.name} died: {type(exc).__name__}: {exc}")

    def _get_keys(self, master: httpx.Client) -> Batch | None:
        pair = self.route.pair
        try:
            resp = master.post(f"/api/v1/keys/{pair.slave}/enc_keys", json={"number": self.rng.randint(1, 4)})
        except httpx.TransportError as exc:
            self.ledger.count(f"enc {'not sent' if isinstance(exc, NOT_SENT) else 'lost'}")
            time.sleep(RETRY_PAUSE)
            return None
        if resp.status_code == 200:
            return self.ledger.issue(pair, resp.json()["keys"])
        bad = etsi_error_problem(resp)
        if resp.status_code != 503 or bad:
            self.ledger.problem(
                f"enc_keys for {pair}: {resp.status_code} {bad or resp.json().get('message')!r}"
            )
        self.ledger.count(f"enc {resp.status_code}")
        time.sleep(RETRY_PAUSE)
        return None


def run_until_served(threads: list[LoadThread], ledger: Ledger, more: int, timeout: float) -> None:
    """Let the load run until ``more`` further Get key answers were served (or ``timeout``): proof
    that the KME serves again after the last kill."""
    target = ledger.counts["enc 200"] + more
    deadline = time.monotonic() + timeout
    while ledger.counts["enc 200"] < target and time.monotonic() < deadline:
        if not any(t.is_alive() for t in threads):
            break
        time.sleep(0.1)
    if ledger.counts["enc 200"] < target:
        ledger.problem(
            f"the KME served fewer than {more} Get key requests in {timeout:g} s after the last kill"
        )


def stop_load(threads: list[LoadThread], stop: threading.Event) -> None:
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), f"{t.name} did not stop"


def settle(routes: dict[Pair, Route], ledger: Ledger, timeout: float = 30.0) -> None:
    """Fetch every batch the load left unsettled, retrying interruptions until ``timeout``."""
    deadline = time.monotonic() + timeout
    for pair, route in routes.items():
        with route.slave_at.client() as slave:
            for batch in [b for b in list(ledger.pending.values()) if b.pair == pair]:
                while time.monotonic() < deadline and not fetch_once(slave, ledger, batch):
                    time.sleep(RETRY_PAUSE * 4)
