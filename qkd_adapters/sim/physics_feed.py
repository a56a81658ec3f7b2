"""Where a simulated link's physics blocks come from: the link's own thread, or worker processes.

Physics (the detector walk: ~2.2-2.8 s of CPU per link second for snspd-modern at 10 km) and
post-processing (Cascade, verification, privacy amplification: ~1.2 s) both hold the GIL, so the
pipelined link (``physics_processes=N``) simulates the next blocks in N child processes while the
link's thread post-processes the current one; with N = 2 on two cores physics and
post-processing share both cores. Each block draws from its own random stream, derived from the
link's seed and the block's index, and block k is sized from blocks 0 .. k - 2 (``SIZING_LAG``)
in every mode, so a seeded link yields the same blocks inline or pipelined, whichever worker
simulated which block. Workers start with ``spawn`` (a KME that hosts the link has threads, which
``fork`` would copy in whatever state they were) on the first block; they are daemons and exit
when the link closes. Blocks cross the pipe with their key bits packed 8 to a byte.

Cost: each worker is one more Python process (~340 MB peak resident with numpy, numba and a 0.25 s
block at 10 km, kept resident by :func:`keep_freed_memory`); up to SIZING_LAG blocks are simulated
ahead, so up to SIZING_LAG + 1 blocks of physics output exist at once, plus their packed copies in
flight. Latency: a block's key still comes out one physics + one post-processing time after the
block was started; the pipeline overlaps consecutive blocks, so the link delivers one block per
max(physics / N, post-processing) instead of per their sum, where the cores are free.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import queue
import time
from collections import deque
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from typing import Any, Protocol

import numpy as np

from qkd_adapters.sim.block_sizing import BlockPlan, BlockSizer, BlockSizing
from qkd_adapters.sim.params import LinkParameters, SPDCParameters
from qkd_adapters.sim.physics.bb84 import BB84Block, simulate_bb84_block
from qkd_adapters.sim.physics.bbm92 import BBM92Block, simulate_bbm92_block
from qkd_adapters.sim.physics.eve import Eavesdropper, InterceptResend

Block = BB84Block | BBM92Block
Fed = tuple[Block, BlockPlan | None, float]  # block, its plan, physics CPU seconds
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_EMPTY = np.zeros(0, dtype=np.uint8)
SIZING_LAG = 2  # block k is sized from blocks <= k - SIZING_LAG: the blocks in flight are not waited for


@dataclass(frozen=True)
class PhysicsSpec:
    """Everything needed to simulate a link's blocks, picklable for the worker processes."""

    params: LinkParameters
    spdc: SPDCParameters
    protocol: str
    eve: Eavesdropper | None
    pulses_per_block: int
    sizing: BlockSizing


class PhysicsFeed(Protocol):
    """A source of physics blocks in link order."""

    def next(self) -> Fed: ...

    def close(self) -> None: ...


def block_rng(seed: np.random.SeedSequence, index: int) -> np.random.Generator:
    """Block ``index``'s own stream: the same whichever process simulates it."""
    return np.random.default_rng(np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, index)))


def make_block(spec: PhysicsSpec, seed: np.random.SeedSequence, index: int, plan: BlockPlan | None) -> Fed:
    """Simulate block ``index`` with the size ``plan`` chose (or the fixed size)."""
    started = time.thread_time()
    rng = block_rng(seed, index)
    n_pulses = plan.pulses if plan is not None else spec.pulses_per_block
    block: Block
    if spec.protocol == "decoy-bb84":
        block = simulate_bb84_block(spec.params, n_pulses, rng, spec.eve)
    else:
        ir = spec.eve if isinstance(spec.eve, InterceptResend) else None
        block = simulate_bbm92_block(spec.params, spec.spdc, n_pulses, rng, ir)
    return block, plan, time.thread_time() - started


class _Planner:
    """Plans block k after blocks 0 .. k - SIZING_LAG were observed, in order (both feeds)."""

    def __init__(self, spec: PhysicsSpec) -> None:
        self.sizer = (
            BlockSizer(spec.sizing, spec.params, protocol=spec.protocol, spdc=spec.spdc)
            if spec.sizing.mode == "finite-key"
            else None
        )

    def plan(self) -> BlockPlan | None:
        return self.sizer.plan() if self.sizer is not None else None

    def observe(self, block: Block) -> None:
        if self.sizer is not None:
            self.sizer.observe(block)


class InlineFeed:
    """Physics in the caller's thread (the default)."""

    def __init__(self, spec: PhysicsSpec, seed: np.random.SeedSequence) -> None:
        self._spec, self._seed, self._planner = spec, seed, _Planner(spec)
        self._plans = deque(self._planner.plan() for _ in range(SIZING_LAG))
        self._index = 0

    @property
    def sizer(self) -> BlockSizer | None:
        return self._planner.sizer

    def next(self) -> Fed:
        fed = make_block(self._spec, self._seed, self._index, self._plans.popleft())
        self._index += 1
        self._planner.observe(fed[0])
        self._plans.append(self._planner.plan())
        return fed

    def close(self) -> None:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory in this process instead of returning it to the OS.

    A block allocates tens of MB of fresh arrays; glibc serves them with mmap (or trims them off
    the heap) and gives them back on free, so every block pays its page faults again: ~0.5-0.9 s of
    system time per link second at 10 km, a quarter of the physics. With the mmap threshold at
    1 GiB and the trim threshold at 2 GiB the process keeps its peak memory and reuses it. Only for
    processes that exist to simulate (the physics workers, ``qkms sim run``): a KME keeps glibc's
    defaults. Returns whether the settings took (False off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False


def _pack(fed: Fed) -> tuple[Any, ...]:
    """A block for the pipe: the key bits packed 8 to a byte (8x less to pickle and copy)."""
    block, plan, cpu = fed
    n = int(block.alice_key.shape[0])
    bare = replace(block, alice_key=_EMPTY, bob_key=_EMPTY)
    return bare, np.packbits(block.alice_key), np.packbits(block.bob_key), n, plan, cpu


def _unpack(packed: tuple[Any, ...]) -> Fed:
    bare, alice, bob, n, plan, cpu = packed
    block = replace(bare, alice_key=np.unpackbits(alice, count=n), bob_key=np.unpackbits(bob, count=n))
    return block, plan, cpu


def _worker(spec: PhysicsSpec, seed: np.random.SeedSequence, tasks: Any, results: Any) -> None:
    """A physics process: (index, plan) tasks in, (index, "block" | "error", payload) out; None stops it."""
    keep_freed_memory()
    while (task := tasks.get()) is not None:
        index, plan = task
        try:
            results.put((index, "block", _pack(make_block(spec, seed, index, plan))))
        except BaseException as exc:  # the parent raises it where the link's errors surface
            results.put((index, "error", f"{type(exc).__name__}: {exc}"))
            return


class ProcessFeed:
    """Physics in ``workers`` child processes, SIZING_LAG blocks ahead of the caller."""

    def __init__(self, spec: PhysicsSpec, seed: np.random.SeedSequence, workers: int) -> None:
        if workers < 1:
            raise ValueError("physics_processes must be >= 1")
        self._spec, self._seed, self._workers = spec, seed, workers
        self._planner = _Planner(spec)
        self._ctx = mp.get_context("spawn")
        self._tasks: Any = None
        self._results: Any = None
        self._procs: list[SpawnProcess] = []
        self._ready: dict[int, Fed] = {}
        self._consumed = 0
        self._dispatched = 0
        self._closed = False

    def _dispatch(self) -> None:
        self._tasks.put((self._dispatched, self._planner.plan()))
        self._dispatched += 1

    def _start(self) -> None:
        self._tasks, self._results = self._ctx.Queue(), self._ctx.Queue()
        for i in range(self._workers):
            proc = self._ctx.Process(
                target=_worker,
                args=(self._spec, self._seed, self._tasks, self._results),
                name=f"qkd-sim-physics-{i}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        for _ in range(SIZING_LAG):
            self._dispatch()

    def next(self) -> Fed:
        if self._closed:
            raise RuntimeError("physics feed closed")
        if not self._procs:
            self._start()
        while self._consumed not in self._ready:
            try:
                index, kind, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                if self._closed or not all(p.is_alive() for p in self._procs):
                    raise RuntimeError("a physics process stopped") from None
                continue
            if kind == "error":
                raise RuntimeError(f"physics process failed on block {index}: {payload}")
            self._ready[index] = _unpack(payload)
        fed = self._ready.pop(self._consumed)
        self._consumed += 1
        self._planner.observe(fed[0])
        self._dispatch()
        return fed

    def close(self) -> None:
        self._closed = True
        if not self._procs:
            return
        for _ in self._procs:
            self._tasks.put(None)
        with contextlib.suppress(Exception):  # results nobody will read: let the workers' puts finish
            while True:
                self._results.get(timeout=0.2)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for q in (self._tasks, self._results):
            q.close()
            q.cancel_join_thread()
        self._procs = []


def check_processes(processes: object) -> int:
    """The physics process count, 0 (inline) to 8; anything else is refused."""
    if isinstance(processes, bool) or not isinstance(processes, int) or not 0 <= processes <= 8:
        raise ValueError("physics_processes must be an integer from 0 (inline) to 8")
    return processes


def open_feed(spec: PhysicsSpec, seed: np.random.SeedSequence, processes: int) -> InlineFeed | ProcessFeed:
    """The link's physics feed: worker processes when ``processes`` > 0, else inline."""
    return ProcessFeed(spec, seed, processes) if processes > 0 else InlineFeed(spec, seed)
