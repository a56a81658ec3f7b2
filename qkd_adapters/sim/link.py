"""A simulated QKD device pair as a key source: physics + post-processing in a worker thread.

:class:`SimulatedLink` simulates blocks of pulses (:mod:`.physics`), post-processes them
(:func:`.pipeline.run_postprocessing`) and hands out the results through the
:class:`~qkd_adapters.keyblock.KeySource` protocol: a :class:`KeyBlock` per successful block
(identical material and block ID at both ends) or a :class:`LinkAlarm` per aborted one. The link
itself is Alice's end; ``end("alice")`` / ``end("bob")`` give each device's own source. Pacing
``"realtime"`` releases a block only when its simulated acquisition time has elapsed on the wall
clock; ``"fast"`` runs as fast as the CPU allows. Nothing here logs key material.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from qkd_adapters.keyblock import KeyBlock, KeySourceError, LinkAlarm, LinkEvent, Provenance
from qkd_adapters.sim.attack import AttackSpec
from qkd_adapters.sim.block_sizing import CLOSED_FIXED, BlockSizer, BlockSizing
from qkd_adapters.sim.params import LinkParameters, load_preset, load_spdc
from qkd_adapters.sim.physics_feed import InlineFeed, PhysicsSpec, check_processes, open_feed
from qkd_adapters.sim.pipeline import PostprocessConfig, PostprocessResult, run_postprocessing
from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import Authenticator, ClassicalChannel, Party

Protocol_ = Literal["decoy-bb84", "bbm92"]
Pacing = Literal["realtime", "fast"]
ADAPTER = "simulated-link"
__all__ = ["ADAPTER", "AttackSpec", "LinkEnd", "SimulatedLink"]


class LinkEnd:
    """One device's view of the link: a KeySource yielding that end's events."""

    def __init__(self, link: SimulatedLink, party: Party, maxlen: int) -> None:
        self._link = link
        self.party = party
        self._events: collections.deque[LinkEvent] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self.attached = party == "alice"

    @property
    def link_id(self) -> str:
        return self._link.link_id

    def describe(self) -> Mapping[str, Any]:
        return {**self._link.describe(), "end": self.party}

    def _push(self, event: LinkEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _full(self) -> bool:
        return self.attached and len(self._events) == self._events.maxlen

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]:
        self._link._raise_if_failed()
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while not self._events and timeout > 0 and not self._link.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            out = [self._events.popleft() for _ in range(min(max_events, len(self._events)))]
        self._link._wake()
        return out

    def close(self) -> None:
        self._link.close()


class SimulatedLink:
    """A simulated decoy-BB84 or BBM92 link producing key blocks in a background thread."""

    def __init__(
        self,
        link_id: str,
        preset: str | LinkParameters = "gys",
        *,
        distance_km: float | None = None,
        protocol: Protocol_ = "decoy-bb84",
        clock_rate_hz: float | None = None,
        attack: AttackSpec | str | None = None,
        pulses_per_block: int | None = None,
        seconds_per_block: float | None = None,
        seed: int | None = None,
        pacing: Pacing = "fast",
        authenticator: Authenticator | None = None,
        postprocess: PostprocessConfig | None = None,
        pa_family: str | None = None,
        max_queue: int = 64,
        autostart: bool = True,
        block_sizing: BlockSizing | str | None = None,
        max_block_seconds: float | None = None,
        block_efficiency: float | None = None,
        physics_processes: int = 0,
    ) -> None:
        if not link_id:
            raise ValueError("link_id must not be empty")
        if protocol not in ("decoy-bb84", "bbm92"):
            raise ValueError("protocol must be 'decoy-bb84' or 'bbm92'")
        if pacing not in ("realtime", "fast"):
            raise ValueError("pacing must be 'realtime' or 'fast'")
        base = load_preset(preset) if isinstance(preset, str) else preset
        overrides: dict[str, Any] = {}
        if distance_km is not None:
            overrides["length_km"] = float(distance_km)
        if clock_rate_hz is not None:
            overrides["clock_rate_hz"] = float(clock_rate_hz)
        self.params = base.with_overrides(**overrides) if overrides else base
        self.spdc = load_spdc(preset) if isinstance(preset, str) else load_spdc("gys")
        self.pulses_per_block = _block_pulses(pulses_per_block, seconds_per_block, self.params.clock_rate_hz)
        self.attack = AttackSpec.parse(attack)
        self.sizing = _sizing(block_sizing, max_block_seconds, block_efficiency)
        if self.sizing.mode == "finite-key" and (pulses_per_block, seconds_per_block) != (None, None):
            raise ValueError(
                "finite-key block sizing chooses the block size: give no pulses or seconds per block"
            )
        if protocol == "bbm92" and self.attack.kind not in ("none", "intercept-resend"):
            raise ValueError("BBM92 models only intercept-resend attacks")
        self._link_id = link_id
        self.protocol: Protocol_ = protocol
        self.pacing: Pacing = pacing
        self.seed = seed
        self.physics_processes = check_processes(physics_processes)
        # Two streams from one seed: physics (possibly in another process) and post-processing.
        physics_seed, post_seed = np.random.SeedSequence(seed).spawn(2)
        self._rng = np.random.default_rng(post_seed)
        spec = PhysicsSpec(
            self.params, self.spdc, protocol, self.attack.eavesdropper(), self.pulses_per_block, self.sizing
        )
        self._feed = open_feed(spec, physics_seed, self.physics_processes)
        self._auth = authenticator
        self._config = postprocess if postprocess is not None else PostprocessConfig()
        if pa_family is not None:  # a plain option, so a KME's [links.options] can choose it
            self._config = replace(self._config, pa_family=pa_family)
        self._ends: dict[Party, LinkEnd] = {p: LinkEnd(self, p, max_queue) for p in ("alice", "bob")}
        self._stop = threading.Event()
        self._wake_event = threading.Event()
        self._error: BaseException | None = None
        self._counter = 0
        self.blocks_produced = 0
        self.simulated_seconds = 0.0
        self._thread: threading.Thread | None = None
        if autostart:
            self.start()

    # KeySource -------------------------------------------------------------------------------
    @property
    def link_id(self) -> str:
        return self._link_id

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def _sizer(self) -> BlockSizer | None:
        """The block sizer when physics runs in this process (tests look at its next plan)."""
        return self._feed.sizer if isinstance(self._feed, InlineFeed) else None

    @property
    def postprocess(self) -> PostprocessConfig:
        """The post-processing configuration every block runs with (thresholds, PA family)."""
        return self._config

    def describe(self) -> Mapping[str, Any]:
        p = self.params
        fixed = self.sizing.mode == "fixed"  # finite-key blocks: each block's size is in its provenance
        return {
            "adapter": ADAPTER,
            "protocol": self.protocol,
            "is_qkd": True,
            "simulated": True,
            "preset": p.name,
            "distance_km": p.length_km,
            "clock_rate_hz": p.clock_rate_hz,
            "pulses_per_block": self.pulses_per_block if fixed else None,
            "seconds_per_block": self.pulses_per_block / p.clock_rate_hz if fixed else None,
            "block_sizing": self.sizing.mode,
            "max_block_seconds": None if fixed else self.sizing.max_block_seconds,
            "physics_processes": self.physics_processes,
            "attack": self.attack.label(),
            "pacing": self.pacing,
            "eps_sec": p.eps_sec,
            "eps_cor": p.eps_cor,
        }

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]:
        """Alice's end (the link as its own KeySource)."""
        return self._ends["alice"].pull(max_events, timeout)

    def close(self) -> None:
        self._stop.set()
        self._wake_event.set()
        for end in self._ends.values():
            with end._cond:
                end._cond.notify_all()
        self._feed.close()  # first: a worker waiting for the physics process then returns
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # Both ends and control ---------------------------------------------------------------------
    def end(self, party: Party) -> LinkEnd:
        """The KeySource of one device; both yield the same block IDs with identical material."""
        if party not in self._ends:
            raise ValueError("party must be 'alice' or 'bob'")
        e = self._ends[party]
        e.attached = True
        return e

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name=f"qkd-sim-{self._link_id}", daemon=True)
            self._thread.start()

    def produce_block(self) -> tuple[LinkEvent, LinkEvent]:
        """Simulate and post-process one block now; the (Alice, Bob) events (no queueing)."""
        self._counter += 1
        block_id = f"{self._link_id}-{self._counter:08d}-{uuid.uuid4().hex[:12]}"
        block, plan, physics_cpu = self._feed.next()
        post_started = time.thread_time()
        channel = ClassicalChannel(self._auth)
        result = run_postprocessing(
            block, self.params, channel, self._rng, self.params.eps_sec, self.params.eps_cor, self._config
        )
        self.blocks_produced += 1
        self.simulated_seconds += float(block.duration_s)
        details = self._details(block, result)
        details["cpu_s"] = {"physics": physics_cpu, "postprocessing": time.thread_time() - post_started}
        details["block_sizing"] = (
            plan.provenance(self.params.clock_rate_hz, self.sizing)
            if plan is not None
            else {"mode": "fixed", "link_seconds": float(block.duration_s), "closed_by": CLOSED_FIXED}
        )
        if not result.ok or result.alice_key is None or result.bob_key is None:
            alarm = LinkAlarm(
                link_id=self._link_id,
                block_id=block_id,
                reason=str(result.alarm),
                details={**details, "detail": result.alarm_detail},
            )
            return alarm, alarm
        return self._key_block(block_id, result.alice_key, result, details), self._key_block(
            block_id, result.bob_key, result, details
        )

    # internals ---------------------------------------------------------------------------------
    def _key_block(
        self, block_id: str, key: U8Array, result: PostprocessResult, details: Mapping[str, Any]
    ) -> KeyBlock:
        return KeyBlock(
            link_id=self._link_id,
            block_id=block_id,
            material=np.packbits(key).tobytes(),
            bit_length=int(key.shape[0]),
            provenance=Provenance(
                protocol=self.protocol,
                is_qkd=True,
                adapter=ADAPTER,
                distance_km=self.params.length_km,
                qber=result.qber,
                leaked_bits=result.leaked_bits,
                epsilon_sec=result.eps_sec,
                epsilon_cor=result.eps_cor,
                pa_ratio=result.pa_ratio,
                simulated=True,
                alarms=(),
                details=details,
            ),
        )

    def _details(self, block: Any, result: PostprocessResult) -> dict[str, Any]:
        rec = result.reconciliation
        d: dict[str, Any] = {
            "preset": self.params.name,
            "clock_rate_hz": self.params.clock_rate_hz,
            "n_pulses": int(block.n_pulses),
            "duration_s": float(block.duration_s),
            "attack": self.attack.label(),
            "sifted_bits": result.sifted_bits,
            "final_bits": result.final_bits,
            "qber_test_basis": result.qber_test,
            "leaked_ec_bits": result.leaked_ec_bits,
            "leaked_verification_bits": result.leaked_verification_bits,
            "verification_collision_bound": result.collision_bound,
            "decoy_bounds": dict(result.decoy),
            "reconciliation": None
            if rec is None
            else {
                "algorithm": "cascade",
                "block_sizes": list(rec.block_sizes),
                "frame_bits": rec.frame_bits,
                "rounds": rec.rounds,
                "efficiency": rec.efficiency() if rec.errors_corrected else None,
            },
            "privacy_amplification": result.privacy_amplification,
            "classical_channel": result.channel,
            "postprocessing_s": dict(result.timings_s),
            "postprocessing_cpu_s": dict(result.cpu_s),
        }
        if hasattr(block, "chsh_s"):
            d["chsh_s"] = float(block.chsh_s)
        return d

    def _wake(self) -> None:
        self._wake_event.set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise KeySourceError(f"simulated link {self._link_id} failed: {type(self._error).__name__}")

    def _worker(self) -> None:
        start = time.monotonic()
        sim_elapsed = 0.0
        try:
            while not self._stop.is_set():
                while any(e._full() for e in self._ends.values()) and not self._stop.is_set():
                    self._wake_event.wait(0.1)
                    self._wake_event.clear()
                if self._stop.is_set():
                    break
                before = self.simulated_seconds
                ev_a, ev_b = self.produce_block()
                sim_elapsed += self.simulated_seconds - before
                if self.pacing == "realtime":
                    delay = start + sim_elapsed - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                self._ends["alice"]._push(ev_a)
                self._ends["bob"]._push(ev_b)
        except BaseException as exc:  # surfaced to the KMS by pull(); after close() it is the shutdown
            if not self._stop.is_set():
                self._error = exc
            for end in self._ends.values():
                with end._cond:
                    end._cond.notify_all()


def _sizing(
    spec: BlockSizing | str | None, max_seconds: float | None, efficiency: float | None
) -> BlockSizing:
    """A BlockSizing from the constructor's plain options (so a KME's [links.options] can set them)."""
    base = spec if isinstance(spec, BlockSizing) else BlockSizing(mode=spec or "fixed")  # type: ignore[arg-type]
    if max_seconds is not None:
        step = min(base.step_seconds, float(max_seconds))
        base = replace(base, max_block_seconds=float(max_seconds), step_seconds=step)
    return base if efficiency is None else replace(base, efficiency=float(efficiency))


def _block_pulses(pulses: int | None, seconds: float | None, clock_rate_hz: float) -> int:
    """Pulses of a fixed block: given, or seconds x clock, or one second of pulses."""
    if pulses is not None and seconds is not None:
        raise ValueError("give pulses_per_block or seconds_per_block, not both")
    n = int(pulses) if pulses is not None else round((1.0 if seconds is None else seconds) * clock_rate_hz)
    if n <= 0:
        raise ValueError("a block needs at least one pulse")
    return n
