"""Processes as /proc shows them, for tests that kill or count a KME's processes."""

from __future__ import annotations

from pathlib import Path


def worker_pids(supervisor: int) -> set[int]:
    """Live API workers of a ``qkms serve --workers N`` supervisor (its spawned children)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == supervisor and fields[0] != "Z" and b"spawn_main" in cmdline:
            pids.add(int(stat.parent.name))
    return pids
