"""The envelope's keyring under a rotation (docs/DECISIONS.md D-27), without a server: a record
sealed under a version this process has not loaded yet opens after the keyring syncs, also for a
request that fails while another thread's sync is still loading that version (the race the delivery
benchmark hit under a rotation: 13 errors in 8 s before the fix); a wrong key never opens a record."""

from __future__ import annotations

import os
import threading
import time

import pytest

from kms.crypto.envelope import Envelope, MaterialIntegrityError


def test_a_record_under_an_unloaded_version_opens_after_a_sync() -> None:
    new_kek = os.urandom(32)
    sealed = Envelope(new_kek, "kek-2").seal(b"k" * 32, b"aad")
    env = Envelope(os.urandom(32), "kek-1")
    with pytest.raises(MaterialIntegrityError):
        env.open(sealed, b"aad")  # no sync attached: nothing to learn the new version from
    env.attach_sync(lambda e: e.add_version("kek-2", new_kek), every_seconds=60)
    assert env.open(sealed, b"aad") == b"k" * 32
    assert env.open(sealed, b"aad", "kek-2") == b"k" * 32
    with pytest.raises(MaterialIntegrityError):
        env.open(sealed, b"aad", "kek-1")  # the version the row names, only that one


def test_requests_failing_during_a_slow_sync_wait_for_it() -> None:
    new_kek = os.urandom(32)
    sealed = Envelope(new_kek, "kek-2").seal(b"k" * 32, b"aad")
    env = Envelope(os.urandom(32), "kek-1")
    loading = threading.Event()

    def slow_sync(e: Envelope) -> None:
        loading.set()
        time.sleep(0.3)  # a PKCS#11 unwrap, a slow database
        e.add_version("kek-2", new_kek)

    env.attach_sync(slow_sync, every_seconds=60)
    results: list[object] = []

    def request() -> None:
        try:
            results.append(env.open(sealed, b"aad"))
        except MaterialIntegrityError as exc:
            results.append(exc)

    first = threading.Thread(target=request)
    first.start()
    assert loading.wait(5)
    others = [threading.Thread(target=request) for _ in range(4)]  # fail while the sync is loading
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(10)
    assert results == [b"k" * 32] * 5


def test_the_sealing_version_and_its_name_go_together() -> None:
    env = Envelope(os.urandom(32), "kek-1")
    env.add_version("kek-2", os.urandom(32))
    sealer = env.writer()
    env.set_write("kek-2")  # a sync switches while a statement is being built
    sealed = sealer.seal(b"x" * 16, b"aad")
    assert sealer.kek_id == "kek-1" and env.open(sealed, b"aad", sealer.kek_id) == b"x" * 16
    env.forget("kek-2")  # the write version is never forgotten
    assert env.kek_id == "kek-2" and "kek-2" in env.versions
