"""The audit stream as a JSON-lines file, safe under log rotation.

Before each batch the sink compares the open file with what the path names now (device and inode,
as ``logging.handlers.WatchedFileHandler`` does): if the file was moved or deleted by logrotate or
an operator, it opens a new one at the path, so nothing is written into a rotated file after the
rotation. A batch is delivered once written, flushed and (with ``fsync``) synced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kms.domain.audit_chain import AuditRecord
from kms.siem.records import audit_line
from kms.siem.sink import SinkError
from kms.storage.file_modes import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE


class FileSink:
    name = "file"

    def __init__(self, path: Path, kme_id: str, fsync: bool = True) -> None:
        self.path = path
        self.kme_id = kme_id
        self.fsync = fsync
        self._fd: int | None = None
        self._delivered: tuple[int, str] | None = None

    def check(self) -> None:
        """At start: the file can be opened for appending (one-line :class:`SinkError` if not)."""
        self._open()

    def send(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        data = "".join(audit_line(r, self.kme_id) + "\n" for r in records).encode("ascii")
        try:
            fd = self._current()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            self.reset()
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._delivered = (records[-1].seq, records[-1].hash)

    def delivered(self) -> tuple[int, str] | None:
        done, self._delivered = self._delivered, None
        return done

    def in_flight(self) -> int:
        return 0

    def reset(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _current(self) -> int:
        """The open file, reopened when the path names another file now (rotated) or none."""
        if self._fd is not None:
            try:
                now = os.stat(self.path)
                mine = os.fstat(self._fd)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                    return self._fd
            except FileNotFoundError:
                pass
            self.reset()
        return self._open()

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.path, flags, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise SinkError(
                f"siem.file {self.path} cannot be opened for appending: {exc.strerror or exc}"
            ) from exc
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        return fd
