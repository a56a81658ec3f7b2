"""Anchors outside the database: an append-only file that pins every signed checkpoint.

Someone who can write the database can delete the newest checkpoints (and the records they cover)
without breaking any chain inside it. So each checkpoint's number, record range, hash and signing
key's fingerprint are also appended — fsync'd, under an exclusive ``flock`` shared by every process
of the KME — to ``<config dir>/audit-anchors/<KME ID>.anchors.jsonl`` (``[audit] anchor_dir``), one
JSON object a line. The database is committed first and the anchor written second, so a crash in
between leaves the file at most one checkpoint behind, never ahead; the next writer catches up.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from kms.domain.audit_chain import Checkpoint, canonical_json

ANCHOR_SUFFIX = ".anchors.jsonl"
TAIL_BYTES = 8192  # enough for the last line (a line is about 400 bytes)


class AnchorFileError(RuntimeError):
    """The anchor file cannot be read as a sequence of anchors."""


def key_fingerprint(public_key: bytes) -> str:
    return hashlib.sha384(public_key).hexdigest()


@dataclass(frozen=True)
class Anchor:
    number: int
    from_seq: int
    upto_seq: int
    hash: str
    key_version: int
    signer: str  # SHA-384 of the signing public key
    at: str

    @classmethod
    def of(cls, cp: Checkpoint, public_key: bytes) -> Anchor:
        return cls(
            cp.number, cp.from_seq, cp.upto_seq, cp.hash(), cp.key_version, key_fingerprint(public_key), cp.at
        )

    def line(self) -> bytes:
        return canonical_json(asdict(self)) + b"\n"

    @classmethod
    def parse(cls, raw: bytes) -> Anchor:
        obj = json.loads(raw)
        return cls(
            int(obj["number"]),
            int(obj["from_seq"]),
            int(obj["upto_seq"]),
            str(obj["hash"]),
            int(obj["key_version"]),
            str(obj["signer"]),
            str(obj["at"]),
        )


def anchor_path(config_dir: Path, anchor_dir: Path, kme_id: str) -> Path:
    base = anchor_dir if anchor_dir.is_absolute() else config_dir / anchor_dir
    return base / f"{kme_id}{ANCHOR_SUFFIX}"


def _complete_lines(data: bytes, path: Path, skip_first: bool) -> list[Anchor]:
    """Anchors in ``data``; a last line without its newline is a torn write and is not an anchor."""
    lines = data.split(b"\n")[:-1]  # the part after the last newline is torn (or empty)
    if skip_first and lines:
        lines = lines[1:]  # cut in the middle by the tail read
    out = []
    for i, raw in enumerate(lines):
        try:
            out.append(Anchor.parse(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorFileError(f"{path}: line {i + 1} is not an anchor ({type(exc).__name__})") from exc
    return out


def read_anchors(path: Path, from_first: bool = True) -> list[Anchor]:
    """Every anchor in the file, checked to follow on each other (numbers and ranges).

    ``from_first=False`` for a peer's copy, which starts at whichever checkpoint the peer first saw."""
    anchors = _complete_lines(path.read_bytes(), path, skip_first=False)
    prev_number, prev_upto = 0, 0
    if anchors and not from_first:
        prev_number, prev_upto = anchors[0].number - 1, anchors[0].from_seq - 1
    for a in anchors:
        if a.number != prev_number + 1 or a.from_seq != prev_upto + 1 or a.upto_seq < a.from_seq:
            raise AnchorFileError(
                f"{path}: anchor #{a.number} (seq {a.from_seq}..{a.upto_seq}) does not follow"
                f" #{prev_number} (seq ..{prev_upto}): the anchor file itself was altered"
            )
        prev_number, prev_upto = a.number, a.upto_seq
    return anchors


class AnchorBook:
    """The anchor file while this process holds its lock: the last anchor, and appends."""

    def __init__(self, path: Path, fd: int, from_first: bool = True) -> None:
        self.path = path
        self._fd = fd
        self.from_first = from_first
        self.last = self._read_last()

    def _read_last(self) -> Anchor | None:
        size = os.fstat(self._fd).st_size
        start = max(0, size - TAIL_BYTES)
        data = os.pread(self._fd, size - start, start)
        if data and not data.endswith(b"\n"):
            # A torn append (crash mid-write): drop the partial line so the next one starts clean.
            keep = data.rfind(b"\n") + 1
            os.ftruncate(self._fd, start + keep)
            os.fsync(self._fd)
            data = data[:keep]
        anchors = _complete_lines(data, self.path, skip_first=start > 0)
        return anchors[-1] if anchors else None

    def append(self, anchors: Sequence[Anchor]) -> None:
        """Append and fsync; anchors must continue the file's numbering."""
        if not anchors:
            return
        expected = (self.last.number if self.last else 0) + 1
        if anchors[0].number != expected and (self.last is not None or self.from_first):
            raise AnchorFileError(f"{self.path}: anchor #{anchors[0].number} does not follow #{expected - 1}")
        os.write(self._fd, b"".join(a.line() for a in anchors))
        os.fsync(self._fd)
        self.last = anchors[-1]


class AnchorFile:
    """A KME's own anchor file (numbered from checkpoint #1), or with ``from_first=False`` a copy kept
    for a peer KME (``kms.audit.peer_copies``), which starts where the peering started."""

    def __init__(self, path: Path, from_first: bool = True) -> None:
        self.path = path
        self.from_first = from_first

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[Anchor]:
        return read_anchors(self.path, self.from_first) if self.path.exists() else []

    def create(self) -> None:
        """Create the directory (0700) and an empty file (0600) if missing, durably."""
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @contextmanager
    def locked(self) -> Iterator[AnchorBook]:
        """The file under an exclusive lock (every checkpoint writer of every process takes it)."""
        self.create()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield AnchorBook(self.path, fd, self.from_first)
        finally:
            os.close(fd)  # releases the lock


def anchor_problems(
    anchors: Sequence[Anchor],
    checkpoints: Sequence[Checkpoint],
    last_record_seq: int,
    signer_keys: Mapping[int, bytes] | None,
    source: str,
) -> list[str]:
    """What the database (or an export) lost or changed against the anchors."""
    problems: list[str] = []
    by_number: dict[int, Checkpoint] = {}
    for cp in checkpoints:
        by_number.setdefault(cp.number, cp)
    for a in anchors:
        name = f"checkpoint #{a.number} (seq {a.from_seq}..{a.upto_seq}, anchored in {source})"
        found = by_number.get(a.number)
        if found is None:
            problems.append(f"{name} is missing (deleted)")
        elif found.hash() != a.hash or found.from_seq != a.from_seq or found.upto_seq != a.upto_seq:
            problems.append(f"{name} differs from its anchor (altered or forged)")
        elif signer_keys is not None:
            key = signer_keys.get(a.key_version)
            if key is None or key_fingerprint(key) != a.signer:
                problems.append(
                    f"{name}: signing key version {a.key_version} is not the anchored key (replaced)"
                )
    if anchors and last_record_seq < anchors[-1].upto_seq:
        problems.append(
            f"audit truncated: the last record is seq {last_record_seq}, but records up to seq"
            f" {anchors[-1].upto_seq} are anchored in {source}"
        )
    return problems
