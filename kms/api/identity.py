"""Maps a verified client certificate to a registered SAE (pinned fingerprint and CN must both match)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import anyio
from structlog.contextvars import bind_contextvars

from kms.api.denials import Denial, DenialAggregator, write_denials
from kms.api.errors import error_response
from kms.api.request_log import log_fields
from kms.crypto.pki import certificate_common_name, certificate_role, fingerprint_sha256
from kms.domain.errors import NotEntitled
from kms.domain.saes import SaeInfo, SaeState
from kms.runtime.assembly import Runtime
from kms.service import registry as registry_service


@functools.lru_cache(maxsize=4096)
def _cert_identity(der: bytes) -> tuple[str, str, str | None]:
    """(fingerprint, CN, role) of a client certificate, parsed once per distinct certificate."""
    return fingerprint_sha256(der), certificate_common_name(der), certificate_role(der)


def sae_from_scope(scope: MutableMapping[str, Any], runtime: Runtime) -> SaeInfo:
    """The calling SAE, or ``NotEntitled`` if the certificate maps to none or to one that is not active.

    The registry is first brought up to date with the database's version if ``refresh_ms`` has
    passed since this process last compared (DECISIONS.md D-29): a revocation, suspension or
    rotation applies to the next request, on a keep-alive connection too."""
    der = scope.get("extensions", {}).get("tls", {}).get("client_cert_der")
    if not der:
        raise NotEntitled("a client certificate is required")
    fingerprint, common_name, role = _cert_identity(der)
    registry = runtime.registry
    interval = runtime.settings.sae_registry.refresh_ms / 1000
    if registry.next_check <= time.monotonic():
        registry_service.refresh_if_changed(runtime.db, registry, interval, _remote_entries(runtime))
    info = registry.by_fingerprint(fingerprint)
    if info is None and registry.stale():
        registry_service.reload(runtime.db, registry, _remote_entries(runtime))
        info = registry.by_fingerprint(fingerprint)
    if info is None:
        raise NotEntitled("the client certificate does not belong to a registered SAE")
    if not info.enabled:
        state = "revoked" if info.state == SaeState.REVOKED else "suspended"
        raise NotEntitled(f"SAE {info.sae_id} is {state} at this KME")
    if info.sae_id != common_name:
        raise NotEntitled("the client certificate's CN does not match its registered SAE ID")
    if role not in (None, info.role):
        raise NotEntitled("the client certificate's role does not match its registration")
    return info


def _remote_entries(runtime: Runtime) -> Callable[[], list[SaeInfo]]:
    """The registry entries that are not in this KME's database: peer KMEs and their SAEs."""
    network = runtime.network
    return (lambda: network.directory.registry_entries()) if network is not None else list


SCOPE_KEY = "qkms.sae"


class SaeAuthMiddleware:
    """Authenticates every HTTP request before routing or body parsing: 401 Error body if unknown.
    Each refusal is logged and audited (``access.denied``), aggregated by ``denials``."""

    def __init__(self, app: Any, runtime: Runtime, denials: DenialAggregator) -> None:
        self.app = app
        self.runtime = runtime
        self.denials = denials

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            try:
                info = sae_from_scope(scope, self.runtime)
                _check_role(scope.get("path", ""), info)
                scope[SCOPE_KEY] = info
                _name_caller(scope, info)
            except NotEntitled as exc:
                records = self.denials.note(_denial(scope, exc.message))
                if records:
                    await anyio.to_thread.run_sync(write_denials, self.runtime.db, records)
                await error_response(401, exc.message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_CALLER_FIELD = {"sae": "sae_id", "kme": "peer_kme_id", "auditor": "auditor_id"}


def _name_caller(scope: Any, info: SaeInfo) -> None:
    """The caller in the request's log line and in every line logged while serving it
    (``kms.api.request_log``): ``sae_id``, ``peer_kme_id`` or ``auditor_id``."""
    name = _CALLER_FIELD.get(info.role, "sae_id")
    fields = log_fields(scope)
    if fields is not None:
        fields[name] = info.sae_id
    bind_contextvars(**{name: info.sae_id})


def _denial(scope: Any, reason: str) -> Denial:
    der = scope.get("extensions", {}).get("tls", {}).get("client_cert_der")
    fingerprint, common_name, role = _cert_identity(der) if der else ("", "", None)
    return Denial(fingerprint, common_name, role, reason, scope.get("method", ""), scope.get("path", ""))


def _check_role(path: str, info: SaeInfo) -> None:
    """Key endpoints are for SAEs only; audit endpoints for auditors only (no key material for them)."""
    if path.startswith("/api/v1/audit") and info.role != "auditor":
        raise NotEntitled("the audit API is for auditor certificates only")
    if path.startswith("/api/v1/keys") and info.role != "sae":
        raise NotEntitled("key delivery is for SAE certificates only; auditors never receive key material")
    if path.startswith("/peer/") and info.role != "kme":
        raise NotEntitled("the KME-to-KME protocol is for KME certificates only")


def current_sae(scope: MutableMapping[str, Any]) -> SaeInfo:
    info: SaeInfo = scope[SCOPE_KEY]
    return info
