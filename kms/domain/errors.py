"""Domain errors. The API maps them onto ETSI GS QKD 014 status codes (400, 401, 503).

Messages are safe to show to the caller: they never contain key material.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class DeliveryError(Exception):
    """Base class: a request the KME refuses, with a message and optional ETSI ``details``."""

    def __init__(self, message: str, details: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details) if details else None


class InvalidRequest(DeliveryError):
    """The request is malformed or asks for something the KME does not serve (HTTP 400)."""


class NotEntitled(DeliveryError):
    """The caller is not who may make this request (HTTP 401)."""


class ServiceUnavailable(DeliveryError):
    """The KME cannot serve right now, e.g. the key pool is short (HTTP 503)."""


# The exact messages ETSI GS QKD 014 defines, so clients can match on them.
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXT_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MSG_EXT_MANDATORY_UNMET = "not all extension_mandatory request options could be met"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"


class PeerRequestRefused(Exception):
    """A request from another KME (a ledger entry, a cancel, a block announcement, a piece claim) that
    this KME must not act on. ``reason`` is safe to log and to answer with; ``kms.peer`` answers it as
    a signed error (``MessageRejected``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
