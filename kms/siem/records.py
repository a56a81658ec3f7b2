"""What the SIEM receives for one audit record: a JSON line, and that line as an RFC 5424 message.

The line holds the record exactly as chained (``kms.domain.audit_chain.AuditRecord``: seq, at, actor,
action, subject, data, prev_hash, hash) plus the KME's ID and a format tag, so a SIEM can find gaps
(seq), duplicates (same seq and hash, from an at-least-once resend) and verify each record's hash
against its predecessor's (docs/OPERATIONS.md, "Audit to SIEM"). It is pure ASCII (``\\uXXXX``
escapes), so syslog receivers pass it through unchanged and no BOM is needed.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from kms.domain.audit_chain import AuditRecord

LINE_FORMAT = "qkms-audit/1"
NILVALUE = "-"
# Severity (RFC 5424 section 6.2.1): warning for refusals, alarms and what a restore or a tamper
# check reports; notice for the rest (every audit record is a security-relevant event).
WARNING, NOTICE = 4, 5
_WARNING_WORDS = (
    "denied",
    "refused",
    "alarm",
    "suspended",
    "revoked",
    "conflict",
    "mismatched",
    "fenced",
    "discarded",
    "held",
)
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def audit_line(record: AuditRecord, kme_id: str) -> str:
    """The record as one JSON object (sorted keys, no whitespace, ASCII), without a newline."""
    obj = {"format": LINE_FORMAT, "kme": kme_id, **record.to_json()}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def severity(action: str) -> int:
    return WARNING if any(word in action for word in _WARNING_WORDS) else NOTICE


def header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most ``limit`` characters;
    anything else becomes ``_`` (an empty value is the NILVALUE)."""
    cleaned = _NOT_PRINTUSASCII.sub("_", value)[:limit]
    return cleaned or NILVALUE


def timestamp(at: str) -> str:
    """The record's time as an RFC 5424 TIMESTAMP (RFC 3339, at most microseconds, UTC as ``Z``)."""
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        return NILVALUE
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def syslog_message(record: AuditRecord, kme_id: str, facility: int, hostname: str) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG``: APP-NAME ``qkms``, PROCID the KME's
    ID, MSGID the action, no structured data, MSG the JSON line."""
    pri = facility * 8 + severity(record.action)
    head = " ".join(
        (
            f"<{pri}>1",
            timestamp(record.at),
            header_field(hostname, 255),
            "qkms",
            header_field(kme_id, 128),
            header_field(record.action, 32),
            NILVALUE,
        )
    )
    return f"{head} {audit_line(record, kme_id)}".encode("ascii")


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 section 3.4.1 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)
