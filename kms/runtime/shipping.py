"""The audit shipper's thread (``[siem]``, docs/OPERATIONS.md "Audit to SIEM").

One process per KME ships, whichever holds the shipper's own lock (a PostgreSQL advisory lock, or an
``flock`` beside the SQLite file, as the pool filler's leader lock): a KME without links, which has
no filler leader, still ships its audit. Each sink is stepped by ``kms.service.audit_shipping``; a
failing one backs off (doubling, bounded) without holding the others back. On stop the thread keeps
going for a short while, so records written while the KME shut down go out too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
from sqlalchemy import text

from kms.runtime.assembly import Runtime
from kms.service.audit_shipping import AuditShipper
from kms.siem.build import SiemConfigError, build_sinks
from kms.siem.sink import SinkError
from kms.storage.siem_positions import PositionStore

log = structlog.get_logger(__name__)
DRAIN_SECONDS = 3.0  # after stop: how long to keep shipping what is left (the join waits 5 s)


@dataclass
class _Retry:
    backoff: float
    next_try: float = 0.0
    down: bool = False


def ship_audit(runtime: Runtime, stop: threading.Event) -> None:
    """Thread body: ship until ``stop`` is set (and drained), while holding the shipper lock."""
    try:
        sinks = build_sinks(runtime.settings)
    except SiemConfigError as exc:  # checked at start by qkms serve; the file may vanish since
        log.error("siem_config_error", error=str(exc))
        return
    cfg = runtime.settings.siem
    positions = PositionStore(cfg.state_dir, runtime.settings.kme.id)
    with _sole_shipper(runtime, stop) as held:
        if not held:
            return
        shippers = [
            AuditShipper(runtime.db, sink, positions, cfg.batch_records, cfg.max_batches_in_flight)
            for sink in sinks
        ]
        retries = [_Retry(cfg.backoff_initial_seconds) for _ in shippers]
        log.info("siem_shipper_started", pid=os.getpid(), sinks=[s.name for s in sinks])
        deadline: float | None = None
        while True:
            if stop.is_set() and deadline is None:
                deadline = time.monotonic() + DRAIN_SECONDS
            sent, waiting = _round(shippers, retries, runtime)
            if deadline is not None and (time.monotonic() >= deadline or (not sent and not waiting)):
                break
            if sent:
                continue
            if deadline is None:
                stop.wait(cfg.poll_seconds)
            else:
                time.sleep(min(cfg.poll_seconds, 0.05))
        for shipper in shippers:
            shipper.sink.reset()


def _round(shippers: list[AuditShipper], retries: list[_Retry], runtime: Runtime) -> tuple[int, bool]:
    """One step of every sink not backing off; returns (records sent, whether any has records sent
    and not yet known delivered)."""
    cfg = runtime.settings.siem
    sent, waiting = 0, False
    now = time.monotonic()
    for shipper, retry in zip(shippers, retries, strict=True):
        name = shipper.sink.name
        if now < retry.next_try:
            continue
        try:
            sent += shipper.step()
            waiting = waiting or shipper.pending()
            if retry.down:
                log.info("siem_sink_up", sink=name)
                retry.down, retry.backoff = False, cfg.backoff_initial_seconds
        except Exception as exc:
            shipper.failed()
            if not retry.down:
                detail = str(exc) if isinstance(exc, SinkError) else type(exc).__name__
                log.warning("siem_sink_down", sink=name, error=detail)
            retry.down = True
            retry.next_try = time.monotonic() + retry.backoff
            retry.backoff = min(2 * retry.backoff, cfg.backoff_max_seconds)
    return sent, waiting


@contextlib.contextmanager
def _sole_shipper(runtime: Runtime, stop: threading.Event) -> Iterator[bool]:
    """Wait for the KME's shipper lock; yields False if stopped before getting it."""
    db = runtime.db
    if db.is_sqlite:
        if db.lock_path is None:  # in-memory database: one process by construction
            yield True
            return
        fd = os.open(db.lock_path.with_suffix(".siem"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if stop.wait(2.0):
                        yield False
                        return
            yield True
        finally:
            os.close(fd)  # releases the lock
        return
    key = zlib.crc32(f"qkms-siem/{runtime.settings.kme.id}".encode())
    with db.engine.connect() as conn:
        while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            conn.commit()
            if stop.wait(2.0):
                yield False
                return
        conn.commit()
        try:
            yield True
        finally:
            with contextlib.suppress(Exception):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
