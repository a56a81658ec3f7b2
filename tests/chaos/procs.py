"""Killing and checking KME processes: SIGKILL one ``qkms serve`` worker or the whole server, wait for
what should follow, and run the real ``qkms db check`` / ``qkms audit verify`` against a config."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess
from tests.support.procfs import worker_pids

T = TypeVar("T")


def chaos_seed() -> int:
    """``QKMS_CHAOS_SEED`` replays a run's kill schedule and request sizes; otherwise a fresh seed."""
    env = os.environ.get("QKMS_CHAOS_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    print(f"chaos seed {seed} (replay with QKMS_CHAOS_SEED={seed})")
    return seed


def redelivery_seconds(config_path: Path) -> float:
    """The redelivery window the KME promises (0 when its config has no such setting, or it is off)."""
    return KmsSettings.load(config_path).pool.redelivery_seconds


def wait_for(predicate: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def supervisor_pid(kme: KmeProcess) -> int:
    assert kme.proc is not None and kme.proc.poll() is None, "qkms serve is not running"
    return kme.proc.pid


def wait_workers(kme: KmeProcess, n: int, without: frozenset[int] = frozenset()) -> set[int]:
    sup = supervisor_pid(kme)
    return wait_for(
        lambda: p if len(p := worker_pids(sup)) == n and not p & without else None,
        f"{n} workers of qkms serve (pid {sup}) up, none of {sorted(without)}",
    )


def kill_worker(kme: KmeProcess, rng: random.Random, workers: int) -> int:
    """SIGKILL one worker; return once the supervisor has started its replacement."""
    victim = rng.choice(sorted(wait_workers(kme, workers)))
    os.kill(victim, signal.SIGKILL)
    wait_workers(kme, workers, without=frozenset({victim}))
    return victim


def kill_server(kme: KmeProcess) -> None:
    """SIGKILL the supervisor and every worker at once (the process group), as a power cut would."""
    pids = {supervisor_pid(kme), *worker_pids(supervisor_pid(kme))}
    kme.kill()
    wait_for(lambda: not any(_alive(p) for p in pids), "every process of the killed server gone")


def restart_server(kme: KmeProcess, workers: int) -> None:
    kme.start(timeout=60)
    if workers > 1:
        wait_workers(kme, workers)


def qkms(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI (``python -m kms``) against a KME's config."""
    cmd = [sys.executable, "-m", "kms", *args, "--config", str(config_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def assert_db_check(config_path: Path, when: str) -> None:
    done = qkms(config_path, "db", "check")
    assert done.returncode == 0, (
        f"qkms db check {when}: exit {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    )


def assert_audit_verify(config_path: Path, when: str) -> None:
    done = qkms(config_path, "audit", "verify")
    assert done.returncode == 0, (
        f"qkms audit verify {when}: exit {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    )
