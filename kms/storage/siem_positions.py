"""The shipped position of each SIEM sink, kept in a small state file (``[siem] state_dir``).

One JSON file per sink (``<kme>.<sink>.json``: the seq and hash of the newest record known to be
delivered), replaced atomically (a fresh owner-only file, fsync, rename, directory fsync), so a crash
leaves the old position or the new one, never a torn one. A file rather than a table: it belongs to
the shipper of one host, costs no migration, and losing it only means sending everything again
(at least once; docs/DECISIONS.md D-33).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kms.storage.file_modes import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE


@dataclass(frozen=True)
class ShippedPosition:
    seq: int
    hash: str
    at: str  # when it was recorded (UTC, ISO 8601)


class PositionError(RuntimeError):
    """The state file exists but cannot be read as a position (one line)."""


class PositionStore:
    def __init__(self, directory: Path, kme_id: str) -> None:
        self.directory = directory
        self.kme_id = kme_id

    def path(self, sink: str) -> Path:
        return self.directory / f"{self.kme_id}.{sink}.json"

    def load(self, sink: str) -> ShippedPosition | None:
        """None when nothing was shipped yet (no file)."""
        path = self.path(sink)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            return ShippedPosition(int(obj["seq"]), str(obj["hash"]), str(obj["at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PositionError(f"SIEM state file {path} is unreadable: {type(exc).__name__}") from exc

    def save(self, sink: str, seq: int, record_hash: str) -> ShippedPosition:
        position = ShippedPosition(seq, record_hash, datetime.now(UTC).isoformat(timespec="microseconds"))
        self.directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        path = self.path(sink)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps({"sink": sink, "seq": seq, "hash": record_hash, "at": position.at}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return position
