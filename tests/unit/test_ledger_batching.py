"""The ledger batcher toward an adjacent KME (``kms.peer.batching``, DECISIONS.md D-20): requests
share batches, at most ``IN_FLIGHT`` batches are out, the next batch is collected while one is out
but paced by the peer's answer time (not at once, which would make every batch tiny), a lone request
goes at once, and a batch that fails fails every request in it. A fake ``deliver`` stands in for the
cut, the peer and the settle (their real code is tested in tests/peer); times are generous, since
the machine running the suite is shared."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import cast

import pytest

from kms.domain.delivery import KeyOrder
from kms.peer.batching import IN_FLIGHT, LedgerBatcher, LedgerRequest

PREPARE = 0.01  # the fake cut and signature
ANSWER = 0.08  # the fake peer's answer time


class FakePeer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.lock = threading.Lock()
        self.out = 0
        self.most_out = 0
        self.sent_at: list[float] = []
        self.sizes: list[int] = []

    def deliver(self, _peer: str, batch: list[LedgerRequest], sending: Callable[[], None]) -> None:
        time.sleep(PREPARE)
        if self.fail:
            raise RuntimeError("the peer refused the batch")
        sending()  # the cut is done: the message goes out
        with self.lock:
            self.out += 1
            self.most_out = max(self.most_out, self.out)
            self.sent_at.append(time.monotonic())
            self.sizes.append(len(batch))
        time.sleep(ANSWER)
        with self.lock:
            self.out -= 1
        for r in batch:
            r.future.set_result([])


def _request() -> LedgerRequest:
    return LedgerRequest(cast(KeyOrder, None))


def test_a_lone_request_goes_at_once() -> None:
    peer = FakePeer()
    batcher = LedgerBatcher(peer.deliver, "KME-X")
    started = time.monotonic()
    assert batcher.submit(_request()) == []
    assert peer.sizes == [1]
    assert peer.sent_at[0] - started < PREPARE + 0.05


def test_batches_overlap_but_are_paced_by_the_answer_time() -> None:
    """Eight clients looping for a second: two batches out at times, never more; about one batch
    per answer time (a batcher collecting as soon as a slot is free sends one every cut, ~8x as
    many, each of one or two requests; one batch out at a time sends one per cut + answer)."""
    peer = FakePeer()
    batcher = LedgerBatcher(peer.deliver, "KME-X")
    stop = time.monotonic() + 1.0
    served = [0] * 8

    def client(i: int) -> None:
        while time.monotonic() < stop:
            batcher.submit(_request())
            served[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peer.most_out == IN_FLIGHT == 2
    gaps = [b - a for a, b in zip(peer.sent_at, peer.sent_at[1:], strict=False)]
    # Paced: consecutive sends are about an answer time apart (not a cut apart), and faster than
    # one batch at a time (cut + answer).
    median_gap = sorted(gaps)[len(gaps) // 2]
    assert ANSWER * 0.6 < median_gap < PREPARE + ANSWER, gaps
    assert sum(served) == sum(peer.sizes)
    assert max(peer.sizes) > 2  # requests share batches


def test_a_failing_batch_fails_every_request_in_it_and_the_batcher_goes_on() -> None:
    peer = FakePeer(fail=True)
    batcher = LedgerBatcher(peer.deliver, "KME-X")
    errors: list[BaseException] = []

    def client() -> None:
        with pytest.raises(RuntimeError, match="refused the batch") as caught:
            batcher.submit(_request())
        errors.append(caught.value)

    threads = [threading.Thread(target=client) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert len(errors) == 5
    peer.fail = False
    assert batcher.submit(_request()) == []  # slots were given back: it still serves
