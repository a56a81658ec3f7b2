"""Which PQC backends exist and may be used (docs/DECISIONS.md D-6).

The default backend (pyca/cryptography) must pass its self-test before any provider is handed out:
a broken crypto library fails closed. The optional liboqs backend is handed out only after its own
self-test *and* the interoperability proof against the default backend pass. Results are computed
once per process (they are start-up checks) and cached; ``refresh=True`` recomputes them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from kms.crypto.pqc import liboqs_backend, pyca_backend
from kms.crypto.pqc.base import BackendUnavailableError, KemProvider, SignatureProvider
from kms.crypto.pqc.selftest import CheckResult, interop_checks, self_test

DEFAULT_BACKEND = pyca_backend.BACKEND_NAME
KNOWN_BACKENDS = (pyca_backend.BACKEND_NAME, liboqs_backend.BACKEND_NAME)


@dataclass(frozen=True, slots=True)
class BackendReport:
    """What start-up learned about one backend; ``available`` means providers may be handed out."""

    name: str
    version: str | None
    available: bool
    default: bool
    reason: str | None = None
    location: str | None = None
    self_test: tuple[CheckResult, ...] = ()
    interop: tuple[CheckResult, ...] = ()

    @property
    def self_test_passed(self) -> bool:
        return bool(self.self_test) and all(r.passed for r in self.self_test)

    @property
    def interop_passed(self) -> bool:
        return bool(self.interop) and all(r.passed for r in self.interop)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "available": self.available,
            "default": self.default,
            "reason": self.reason,
            "location": self.location,
            "self_test_passed": self.self_test_passed,
            "interop_passed": self.interop_passed if not self.default else None,
            "self_test": [r.as_dict() for r in self.self_test],
            "interop": [r.as_dict() for r in self.interop],
        }


@dataclass
class _Entry:
    report: BackendReport
    kem: KemProvider | None = None
    signature: SignatureProvider | None = None


_lock = threading.RLock()
_cache: dict[str, _Entry] = {}


def _failures(results: tuple[CheckResult, ...]) -> str:
    failed = [f"{r.algorithm} {r.check}: {r.detail}" for r in results if not r.passed]
    return "; ".join(failed[:3]) + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")


def _probe_pyca() -> _Entry:
    kem = pyca_backend.PycaKemProvider()
    sig = pyca_backend.PycaSignatureProvider()
    results = self_test(kem, sig)
    ok = all(r.passed for r in results)
    report = BackendReport(
        name=pyca_backend.BACKEND_NAME,
        version=kem.version,
        available=ok,
        default=True,
        reason=None if ok else f"self-test failed: {_failures(results)}",
        self_test=results,
    )
    return _Entry(report, kem if ok else None, sig if ok else None)


def _probe_liboqs() -> _Entry:
    name = liboqs_backend.BACKEND_NAME
    try:
        kem, sig = liboqs_backend.load_liboqs_providers()
    except BackendUnavailableError as exc:
        return _Entry(BackendReport(name=name, version=None, available=False, default=False, reason=str(exc)))
    location = f"{kem.location.path} (found by {kem.location.found_by})"
    own = self_test(kem, sig)
    reference = _entry(DEFAULT_BACKEND)
    if reference.kem is None or reference.signature is None:
        report = BackendReport(
            name=name,
            version=kem.version,
            available=False,
            default=False,
            reason="the default backend failed its self-test, so interoperability cannot be proved",
            location=location,
            self_test=own,
        )
        return _Entry(report)
    interop = interop_checks(reference.kem, reference.signature, kem, sig)
    reason = None
    if not all(r.passed for r in own):
        reason = f"self-test failed: {_failures(own)}"
    elif not all(r.passed for r in interop):
        reason = f"interoperability with {DEFAULT_BACKEND} not proved: {_failures(interop)}"
    ok = reason is None
    report = BackendReport(
        name=name,
        version=kem.version,
        available=ok,
        default=False,
        reason=reason,
        location=location,
        self_test=own,
        interop=interop,
    )
    return _Entry(report, kem if ok else None, sig if ok else None)


_PROBES = {pyca_backend.BACKEND_NAME: _probe_pyca, liboqs_backend.BACKEND_NAME: _probe_liboqs}


def _entry(name: str, refresh: bool = False) -> _Entry:
    if name not in _PROBES:
        raise BackendUnavailableError(f"unknown PQC backend {name!r} (known: {', '.join(KNOWN_BACKENDS)})")
    with _lock:
        if refresh or name not in _cache:
            _cache[name] = _PROBES[name]()
        return _cache[name]


def available_backends(*, refresh: bool = False) -> tuple[BackendReport, ...]:
    """A report for every known backend (probing, self-testing and interop-checking each once)."""
    with _lock:
        if refresh:
            _cache.clear()
        return tuple(_entry(name).report for name in KNOWN_BACKENDS)


def backend_report(name: str = DEFAULT_BACKEND) -> BackendReport:
    return _entry(name).report


def get_kem_provider(name: str = DEFAULT_BACKEND) -> KemProvider:
    """The named backend's ML-KEM provider, only if it passed its start-up checks."""
    entry = _entry(name)
    if entry.kem is None:
        raise BackendUnavailableError(f"PQC backend {name!r} is not usable: {entry.report.reason}")
    return entry.kem


def get_signature_provider(name: str = DEFAULT_BACKEND) -> SignatureProvider:
    """The named backend's ML-DSA provider, only if it passed its start-up checks."""
    entry = _entry(name)
    if entry.signature is None:
        raise BackendUnavailableError(f"PQC backend {name!r} is not usable: {entry.report.reason}")
    return entry.signature


def clear_cache() -> None:
    """Forget every probe result (tests; or after installing liboqs in a running process)."""
    with _lock:
        _cache.clear()
