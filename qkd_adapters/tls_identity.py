"""Carries the verified TLS client certificate into each ASGI request (the KME's API and the simulated
device both serve over it; it lives here so that the device need not import ``kms``).

uvicorn does not yet publish the ASGI TLS extension, so this protocol subclass adds
``scope["extensions"]["tls"]["client_cert_der"]`` from the connection's SSL object. The certificate
was already verified against the server's CA during the handshake (``CERT_REQUIRED``); the application
then maps it to a caller by pinned fingerprint and CN (``qkd_adapters.certificates``). The KME runs
``kms.api.http_limits.HardenedProtocol``, a subclass with request-head limits and deadlines.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TlsIdentityProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that exposes the peer certificate (DER) to the application."""

    _peer_der: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        self._peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: Any = self.scope
        scope["extensions"] = {"tls": {"client_cert_der": self._peer_der}}
