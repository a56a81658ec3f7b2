"""Key files: a KeySource reading blocks that a device or a lab setup drops into a directory.

Many QKD systems (and most lab setups) can export their final key as files. Both ends of a link
write identically named files into their own directory, so the file name is the block ID both ends
agree on. The convention this adapter reads:

- ``<block_id>.key`` holds the raw key bits, most significant bit of byte 0 first.
- ``<block_id>.json`` (optional) holds the block's provenance: ``protocol``, ``is_qkd``, ``qber``,
  ``distance_km``, ``epsilon_sec``, ``epsilon_cor``, ``leaked_bits``, ``pa_ratio``, ``simulated``,
  ``produced_at`` (ISO 8601) and ``bit_length``; any other fields are kept as provenance details.
- A writer creates each file under another name (``*.tmp``, ``*.part`` or a name starting with
  ``.``, all ignored here) and renames it into place; the sidecar is renamed first and the ``.key``
  file last, so a visible ``.key`` file is always complete and its sidecar already there. Writers
  that cannot rename can rely on ``settle_seconds`` instead: a file modified more recently than that
  is left for a later pull.
- Block IDs are 1 to 128 characters from ``[A-Za-z0-9._-]``; files are taken in name order (so a
  writer that names blocks by a zero-padded counter or a timestamp gets them handed out in order).

Key hygiene: once a block has been read, its ``.key`` file is overwritten with zeros, flushed to
disk and deleted (the sidecar is deleted too), before the block is returned; a rejected file is
destroyed the same way, since bits that failed a check must not be reused. A KMS that fails to store
a returned block loses it rather than ever reading the same bits twice.

Provenance is what the files and the operator declare, nothing more: ``is_qkd`` is True only if the
sidecar says so, or, when the sidecar is silent, the ``is_qkd`` option does. A bad file (empty,
length not matching its sidecar, unreadable or ill-typed sidecar) yields a ``LinkAlarm`` naming the
file and the problem, never key material.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import Any

from qkd_adapters.keyblock import KeyBlock, KeySourceError, LinkAlarm, LinkEvent, Provenance

ADAPTER = "key-files"
KEY_SUFFIX = ".key"
SIDECAR_SUFFIX = ".json"
BLOCK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALARM_CODE = "key-file-rejected"
MAX_SIDECAR_BYTES = 1 << 20

log = logging.getLogger(__name__)

# Sidecar fields that map onto Provenance, with the JSON types they must have.
_FLOAT_FIELDS = ("qber", "distance_km", "epsilon_sec", "epsilon_cor", "pa_ratio")
_KNOWN_FIELDS = frozenset(
    {*_FLOAT_FIELDS, "protocol", "is_qkd", "simulated", "leaked_bits", "bit_length", "produced_at"}
)


class _Rejected(Exception):
    """A key file that cannot be used; the message is safe to log (never material)."""


class KeyFileSource:
    """Hands out ``<block_id>.key`` files from ``directory`` as key blocks, each exactly once."""

    def __init__(
        self,
        link_id: str,
        directory: str | Path,
        *,
        is_qkd: bool = False,
        protocol: str = "unspecified",
        simulated: bool = False,
        distance_km: float | None = None,
        settle_seconds: float = 0.0,
        max_block_bytes: int = 16 * 1024 * 1024,
        require_sidecar: bool = False,
    ) -> None:
        if not link_id:
            raise ValueError("link_id must not be empty")
        if not isinstance(is_qkd, bool) or not isinstance(simulated, bool):
            raise ValueError("is_qkd and simulated must be booleans")
        if settle_seconds < 0:
            raise ValueError("settle_seconds must not be negative")
        if max_block_bytes <= 0:
            raise ValueError("max_block_bytes must be positive")
        self._link_id = link_id
        self.directory = Path(directory)
        self._is_qkd = is_qkd
        self._protocol = str(protocol)
        self._simulated = simulated
        self._distance_km = None if distance_km is None else float(distance_km)
        self._settle = float(settle_seconds)
        self._max_bytes = int(max_block_bytes)
        self._require_sidecar = bool(require_sidecar)
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def link_id(self) -> str:
        return self._link_id

    def describe(self) -> Mapping[str, Any]:
        return {
            "adapter": ADAPTER,
            "directory": str(self.directory),
            "protocol": self._protocol,
            "is_qkd": self._is_qkd,
            "simulated": self._simulated,
            "settle_seconds": self._settle,
            "require_sidecar": self._require_sidecar,
        }

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]:
        """The next complete files in name order, at most ``max_events``; waits up to ``timeout`` s."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            events = self._take(max_events)
            if events or self._closed.is_set():
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed.wait(min(remaining, 0.2)):
                return []

    def close(self) -> None:
        self._closed.set()

    # internals ---------------------------------------------------------------------------------
    def _take(self, max_events: int) -> list[LinkEvent]:
        if max_events <= 0 or self._closed.is_set():
            return []
        with self._lock:  # two pullers must never read the same file
            try:
                names = sorted(
                    entry.name
                    for entry in os.scandir(self.directory)
                    if entry.name.endswith(KEY_SUFFIX) and not entry.name.startswith(".")
                )
            except OSError as exc:
                raise KeySourceError(
                    f"key-file directory {self.directory} cannot be read: {type(exc).__name__}"
                ) from exc
            events: list[LinkEvent] = []
            now = time.time()
            for name in names:
                if len(events) >= max_events:
                    break
                event = self._read_one(self.directory / name, now)
                if event is not None:
                    events.append(event)
            return events

    def _read_one(self, key_path: Path, now: float) -> LinkEvent | None:
        block_id = key_path.name[: -len(KEY_SUFFIX)]
        sidecar = key_path.with_name(block_id + SIDECAR_SUFFIX)
        try:
            stat = key_path.lstat()
        except FileNotFoundError:
            return None  # taken away between listing and reading
        if not S_ISREG(stat.st_mode):
            # A symlink or device node: never read through it, and never zeroise what it points to.
            log.warning(
                "key file rejected: link=%s file=%s is not a regular file", self._link_id, key_path.name
            )
            key_path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
            return LinkAlarm(
                link_id=self._link_id,
                block_id=None,
                reason=f"{ALARM_CODE}: {key_path.name}: not a regular file",
                severity="warning",
                details={"code": ALARM_CODE, "file": key_path.name, "problem": "not a regular file"},
            )
        if self._settle and now - stat.st_mtime < self._settle:
            return None
        if self._settle and sidecar.exists() and now - sidecar.stat().st_mtime < self._settle:
            return None
        try:
            block = self._parse(key_path, sidecar, block_id, stat.st_size)
        except _Rejected as exc:
            log.warning("key file rejected: link=%s file=%s problem=%s", self._link_id, key_path.name, exc)
            alarm = LinkAlarm(
                link_id=self._link_id,
                block_id=block_id if BLOCK_ID.match(block_id) else None,
                reason=f"{ALARM_CODE}: {key_path.name}: {exc}",
                severity="warning",
                details={
                    "code": ALARM_CODE,
                    "file": key_path.name,
                    "problem": str(exc),
                    "bytes": stat.st_size,
                },
            )
            self._destroy(key_path, sidecar)
            return alarm
        self._destroy(key_path, sidecar)
        return block

    def _parse(self, key_path: Path, sidecar: Path, block_id: str, size: int) -> KeyBlock:
        if not BLOCK_ID.match(block_id):
            raise _Rejected("file name is not a valid block ID (1-128 of A-Z a-z 0-9 . _ -)")
        if size == 0:
            raise _Rejected("key file is empty")
        if size > self._max_bytes:
            raise _Rejected(f"key file holds {size} bytes, more than max_block_bytes {self._max_bytes}")
        meta = self._sidecar(sidecar)
        try:
            fd = os.open(key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                material = fh.read(self._max_bytes + 1)
        except OSError as exc:
            raise _Rejected(f"key file cannot be read ({type(exc).__name__})") from exc
        if len(material) != size:
            raise _Rejected("key file changed size while being read (not renamed into place?)")
        bit_length = 8 * size
        if meta is not None and "bit_length" in meta:
            declared = meta["bit_length"]
            if not _is_int(declared) or declared <= 0:
                raise _Rejected("sidecar bit_length must be a positive integer")
            if math.ceil(declared / 8) != size:
                raise _Rejected(f"sidecar declares {declared} bits but the key file holds {size} bytes")
            bit_length = declared
            if bit_length % 8:  # bits past bit_length in the last byte are zero by contract
                tail = bytearray(material[-1:])
                tail[0] &= (0xFF << (8 - bit_length % 8)) & 0xFF
                material = material[:-1] + bytes(tail)
        return KeyBlock(
            link_id=self._link_id,
            block_id=block_id,
            material=material,
            bit_length=bit_length,
            provenance=self._provenance(meta, key_path.name),
        )

    def _sidecar(self, sidecar: Path) -> dict[str, Any] | None:
        try:
            with sidecar.open("rb") as fh:
                raw = fh.read(MAX_SIDECAR_BYTES + 1)
            if len(raw) > MAX_SIDECAR_BYTES:
                raise _Rejected(f"sidecar is larger than {MAX_SIDECAR_BYTES} bytes")
            text = raw.decode("utf-8")
        except FileNotFoundError:
            if self._require_sidecar:
                raise _Rejected("sidecar file is missing and require_sidecar is set") from None
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise _Rejected(f"sidecar cannot be read ({type(exc).__name__})") from exc
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _Rejected(f"sidecar is not valid JSON (line {exc.lineno})") from exc
        if not isinstance(meta, dict):
            raise _Rejected("sidecar must hold a JSON object")
        for name in _FLOAT_FIELDS:
            if meta.get(name) is not None and not _is_number(meta[name]):
                raise _Rejected(f"sidecar field {name} must be a number")
        if meta.get("qber") is not None and not 0 <= meta["qber"] <= 0.5:
            raise _Rejected("sidecar qber must lie in [0, 0.5]")
        for name in ("is_qkd", "simulated"):
            if name in meta and not isinstance(meta[name], bool):
                raise _Rejected(f"sidecar field {name} must be true or false")
        if meta.get("leaked_bits") is not None and not (
            _is_int(meta["leaked_bits"]) and meta["leaked_bits"] >= 0
        ):
            raise _Rejected("sidecar leaked_bits must be a non-negative integer")
        if "protocol" in meta and not isinstance(meta["protocol"], str):
            raise _Rejected("sidecar protocol must be a string")
        if "produced_at" in meta:
            try:
                stamp = datetime.fromisoformat(str(meta["produced_at"]))
            except ValueError as exc:
                raise _Rejected("sidecar produced_at must be an ISO 8601 time") from exc
            meta["produced_at"] = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
        return meta

    def _provenance(self, meta: Mapping[str, Any] | None, file_name: str) -> Provenance:
        m: Mapping[str, Any] = meta or {}
        extra = {k: v for k, v in m.items() if k not in _KNOWN_FIELDS}
        details: dict[str, Any] = {
            "file": file_name,
            "sidecar": meta is not None,
            # Which declaration made is_qkd what it is: the file's own, or the operator's option.
            "is_qkd_declared_by": "sidecar" if "is_qkd" in m else "option",
            **({"sidecar_fields": extra} if extra else {}),
        }
        distance = m.get("distance_km")
        return Provenance(
            protocol=str(m.get("protocol", self._protocol)),
            is_qkd=bool(m["is_qkd"]) if "is_qkd" in m else self._is_qkd,
            adapter=ADAPTER,
            distance_km=float(distance) if distance is not None else self._distance_km,
            qber=_opt_float(m.get("qber")),
            leaked_bits=m.get("leaked_bits"),
            epsilon_sec=_opt_float(m.get("epsilon_sec")),
            epsilon_cor=_opt_float(m.get("epsilon_cor")),
            pa_ratio=_opt_float(m.get("pa_ratio")),
            simulated=bool(m.get("simulated", self._simulated)),
            produced_at=m.get("produced_at") or datetime.now(UTC),
            details=details,
        )

    def _destroy(self, key_path: Path, sidecar: Path) -> None:
        """Overwrite the key file with zeros, flush it to disk, delete it and its sidecar."""
        try:
            zeroise_file(key_path)
        except OSError as exc:
            # Never hand out bits twice: refuse to go on if a used file cannot be removed.
            raise KeySourceError(
                f"key file {key_path.name} could not be destroyed after use: {type(exc).__name__}"
            ) from exc
        sidecar.unlink(missing_ok=True)


def zeroise_file(path: Path) -> None:
    """Overwrite ``path`` with zeros in place, fsync, then unlink it (never through a symlink)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        chunk = b"\0" * min(size, 1 << 20)
        written = 0
        while written < size:
            written += fh.write(chunk[: size - written])
        fh.flush()
        os.fsync(fh.fileno())
    path.unlink()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
