"""A blocking call bounded in time, with at most one in flight.

Health probes and metric scrapes must answer within a second or two even when the database hangs
(a stopped or unreachable PostgreSQL can block a connect for the TCP timeout). The call runs in a
daemon thread; the caller waits at most ``timeout``. While a call is still running, the next caller
waits for that same call instead of starting another, so a stuck database holds one thread, never
one per probe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

T = TypeVar("T")


class CallTimedOut(TimeoutError):
    """The call did not finish in time (it goes on in its thread; its result serves a later caller)."""


class SingleFlight(Generic[T]):
    def __init__(self, name: str, call: Callable[[], T]) -> None:
        self.name = name
        self._call = call
        self._lock = threading.Lock()
        self._running: Future[T] | None = None

    def start(self) -> Future[T]:
        """Start the call unless one is in flight; the future of the one in flight."""
        with self._lock:
            future = self._running
            if future is None or future.done():
                future = self._running = Future()
                threading.Thread(target=self._work, args=(future,), name=self.name, daemon=True).start()
            return future

    def run(self, timeout: float) -> T:
        """The call's result, or its exception; :class:`CallTimedOut` after ``timeout`` seconds."""
        future = self.start()
        try:
            return future.result(timeout)
        except FutureTimeout as exc:
            raise CallTimedOut(f"{self.name} did not answer within {timeout:g} s") from exc

    def _work(self, future: Future[T]) -> None:
        try:
            future.set_result(self._call())
        except BaseException as exc:
            future.set_exception(exc)
