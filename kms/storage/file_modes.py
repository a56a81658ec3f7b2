"""Owner-only files: what the KME writes (config, database, keys, anchors) is readable by its user alone.

The config can hold a database password, the database holds sealed key material and the audit
trail, and key files are secrets: none of them may be readable by group or others, not even between
creating a file and fixing its mode. So files are created with restrictive modes (a 077 umask, or
an explicit 0600 at ``open``), and files a previous version left readable are tightened.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

OWNER_ONLY_UMASK = 0o077
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def restrict_umask() -> int:
    """Make every file this process creates from now on owner-only; returns the previous umask."""
    old = os.umask(OWNER_ONLY_UMASK)
    os.umask(old | OWNER_ONLY_UMASK)
    return old


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Owner-only creation for the duration of the block (``qkms init`` called as a library)."""
    old = restrict_umask()
    try:
        yield
    finally:
        os.umask(old)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists. SQLite gives a database's ``-wal``
    and ``-shm`` files the database file's own mode, so this one call covers all three."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def tighten(path: Path) -> None:
    """Drop group and other permission bits from ``path`` if it exists and this user owns it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & OWNER_ONLY_UMASK:
        path.chmod(mode & ~OWNER_ONLY_UMASK)
