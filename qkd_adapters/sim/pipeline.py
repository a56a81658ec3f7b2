"""The classical post-processing chain of the simulated link, as the two devices run it.

Sifting is done by the physics simulator; from a sifted block this module runs, with every
message through one authenticated :class:`~.postproc.channel.ClassicalChannel`:

1. parameter estimation - Alice announces the decoy statistics; the test-basis error rate is
   checked against the threshold and the finite-key bound (Lim et al., PRA 89, 022307 (2014),
   :func:`qkd_adapters.sim.finite_key.secret_key_length`) is evaluated with the leak Cascade is
   expected to need, so a block that cannot give key is dropped before reconciliation;
2. error correction - Cascade (:mod:`.postproc.cascade`), every disclosed parity counted;
3. verification - polynomial hashing with collision bound <= eps_cor (:mod:`.postproc.verification`);
4. the secret key length from the finite-key bound with the *actual* leak (parities + tags);
5. privacy amplification - a proven two-universal hash family, multiply-add-shift by default, seed
   from a CSPRNG (:mod:`.postproc.privacy_amplification`).

Any failure aborts the block with an alarm reason and no key. For BBM92 the key length is the
entanglement-based finite-key bound of Tomamichel, Lim, Gisin, Renner, Nat. Commun. 3, 634
(2012), and a CHSH value S <= 2 (no Bell violation) also aborts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkd_adapters.sim.finite_key import FiniteKeyResult, bbm92_secret_key_length, secret_key_length
from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.bb84 import BB84Block
from qkd_adapters.sim.physics.bbm92 import BBM92Block
from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.cascade import (
    CascadeConfig,
    ReconciliationError,
    ReconciliationResult,
    binary_entropy,
    reconcile,
)
from qkd_adapters.sim.postproc.channel import ChannelAuthenticationError, ClassicalChannel
from qkd_adapters.sim.postproc.privacy_amplification import (
    DEFAULT_FAMILY,
    FAMILIES,
    PrivacyAmplificationError,
    amplify,
    describe,
)
from qkd_adapters.sim.postproc.verification import VerificationError, verify_keys

ALARM_QBER = "qber-over-threshold"
ALARM_NO_KEY = "no-positive-key-length"
ALARM_VERIFICATION = "verification-failed"
ALARM_AUTHENTICATION = "authentication-failed"
ALARM_RECONCILIATION = "reconciliation-failed"
ALARM_NO_BELL_VIOLATION = "no-bell-violation"
ALARM_PRIVACY_AMPLIFICATION = "privacy-amplification-failed"
ALARMS = (
    ALARM_QBER,
    ALARM_NO_KEY,
    ALARM_VERIFICATION,
    ALARM_AUTHENTICATION,
    ALARM_RECONCILIATION,
    ALARM_NO_BELL_VIOLATION,
    ALARM_PRIVACY_AMPLIFICATION,
)

EXPECTED_EC_EFFICIENCY = 1.08  # for the pre-check only; the real leak is counted afterwards


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds and algorithm choices of the post-processing."""

    qber_threshold: float = 0.11
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    qber_hint: float | None = None  # Cascade block sizes; default: the test-basis error rate
    pa_family: str = DEFAULT_FAMILY  # privacy amplification: "multiply-add-shift" or "toeplitz"

    def __post_init__(self) -> None:
        if self.pa_family not in FAMILIES:
            known = ", ".join(sorted(FAMILIES))
            raise ValueError(f"unknown privacy-amplification family {self.pa_family!r} (known: {known})")


@dataclass(frozen=True, repr=False)
class PostprocessResult:
    """The outcome of one block; ``alice_key``/``bob_key`` are None when the block aborted."""

    alarm: str | None
    alarm_detail: str | None
    alice_key: U8Array | None
    bob_key: U8Array | None
    sifted_bits: int
    qber_test: float
    qber: float | None
    leaked_ec_bits: int
    leaked_verification_bits: int
    final_bits: int
    eps_sec: float
    eps_cor: float
    finite_key: FiniteKeyResult | None
    reconciliation: ReconciliationResult | None
    collision_bound: float | None
    channel: dict[str, dict[str, int]]
    timings_s: dict[str, float]
    cpu_s: dict[str, float] = field(default_factory=dict)  # the same stages in this thread's CPU time
    decoy: dict[str, float] = field(default_factory=dict)
    privacy_amplification: dict[str, Any] | None = None  # family, lengths, seed bits (metadata)

    @property
    def ok(self) -> bool:
        return self.alarm is None

    @property
    def leaked_bits(self) -> int:
        return self.leaked_ec_bits + self.leaked_verification_bits

    @property
    def pa_ratio(self) -> float:
        """Final key bits per reconciled bit."""
        return self.final_bits / self.sifted_bits if self.sifted_bits else 0.0

    def __repr__(self) -> str:
        return (
            f"PostprocessResult(alarm={self.alarm!r}, sifted_bits={self.sifted_bits}, "
            f"final_bits={self.final_bits}, qber={self.qber})"
        )


def run_postprocessing(
    block: BB84Block | BBM92Block,
    params: LinkParameters,
    channel: ClassicalChannel,
    rng: np.random.Generator,
    eps_sec: float,
    eps_cor: float,
    config: PostprocessConfig | None = None,
) -> PostprocessResult:
    """Post-process one sifted block at both ends; identical final keys or an alarm."""
    cfg = config if config is not None else PostprocessConfig()
    run = _Run(block, params, channel, rng, eps_sec, eps_cor, cfg)
    try:
        return run.execute()
    except ChannelAuthenticationError as exc:
        return run.abort(ALARM_AUTHENTICATION, str(exc))


class _Run:
    """State of one block's post-processing (keeps ``run_postprocessing`` readable)."""

    def __init__(
        self,
        block: BB84Block | BBM92Block,
        params: LinkParameters,
        channel: ClassicalChannel,
        rng: np.random.Generator,
        eps_sec: float,
        eps_cor: float,
        cfg: PostprocessConfig,
    ) -> None:
        self.block, self.params, self.channel, self.rng = block, params, channel, rng
        self.eps_sec, self.eps_cor, self.cfg = eps_sec, eps_cor, cfg
        self.n = int(block.alice_key.shape[0])
        self.qber_test = _test_qber(block)
        self.qber: float | None = None
        self.rec: ReconciliationResult | None = None
        self.fk: FiniteKeyResult | None = None
        self.leak_ec = 0
        self.leak_ver = 0
        self.collision: float | None = None
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._marks: tuple[float, float] = (0.0, 0.0)
        self.decoy: dict[str, float] = {}
        self.pa: dict[str, Any] | None = None

    def _mark(self) -> float:
        self._marks = (time.perf_counter(), time.thread_time())
        return self._marks[0]

    def _lap(self, stage: str) -> None:
        """Wall and CPU time since the last mark, under ``stage``."""
        self.timings[stage] = time.perf_counter() - self._marks[0]
        self.cpu[stage] = time.thread_time() - self._marks[1]

    def abort(self, alarm: str, detail: str | None) -> PostprocessResult:
        return self._result(alarm, detail, None, None, 0)

    def _result(
        self, alarm: str | None, detail: str | None, ka: U8Array | None, kb: U8Array | None, final: int
    ) -> PostprocessResult:
        return PostprocessResult(
            alarm=alarm,
            alarm_detail=detail,
            alice_key=ka,
            bob_key=kb,
            sifted_bits=self.n,
            qber_test=self.qber_test,
            qber=self.qber,
            leaked_ec_bits=self.leak_ec,
            leaked_verification_bits=self.leak_ver,
            final_bits=final,
            eps_sec=self.eps_sec,
            eps_cor=self.eps_cor,
            finite_key=self.fk,
            reconciliation=self.rec,
            collision_bound=self.collision,
            channel=self.channel.summary(),
            timings_s=dict(self.timings),
            cpu_s=dict(self.cpu),
            decoy=dict(self.decoy),
            privacy_amplification=self.pa,
        )

    def _key_length(self, leak: int) -> tuple[int, str | None]:
        if isinstance(self.block, BB84Block):
            fk = secret_key_length(self.block, leak, self.eps_sec, self.eps_cor)
            self.fk = fk
            self.decoy = {
                "s_z0_lower": fk.s_z0,
                "s_z1_lower": fk.s_z1,
                "phase_error_upper": fk.phi_z,
                "s_x1_lower": fk.s_x1,
                "v_x1_upper": fk.v_x1,
            }
            return fk.length, fk.abort_reason
        return bbm92_key_length(self.block, leak, self.eps_sec, self.eps_cor)

    def execute(self) -> PostprocessResult:
        t0 = self._mark()
        block = self.block
        # 1. parameter estimation: the test statistics are announced (public, not key).
        self.channel.send("alice", "pe/statistics", _statistics_payload(block))
        if self.n == 0:
            return self.abort(ALARM_NO_KEY, "no sifted key")
        if isinstance(block, BBM92Block) and not block.chsh_s > 2.0:
            return self.abort(ALARM_NO_BELL_VIOLATION, f"CHSH S = {block.chsh_s:.3f}")
        if not self.qber_test <= self.cfg.qber_threshold:
            return self.abort(ALARM_QBER, f"test-basis error rate {self.qber_test:.4f}")
        hint = self.cfg.qber_hint if self.cfg.qber_hint is not None else self.qber_test
        expected_leak = int(EXPECTED_EC_EFFICIENCY * self.n * binary_entropy(max(hint, 1e-4)))
        length, reason = self._key_length(expected_leak)
        if length <= 0:
            return self.abort(ALARM_NO_KEY, reason)
        self._lap("estimation")
        # 2. error correction
        self._mark()
        try:
            corrected, self.rec = reconcile(
                block.alice_key, block.bob_key, self.channel, hint, self.cfg.cascade
            )
        except ReconciliationError as exc:
            return self.abort(ALARM_RECONCILIATION, str(exc))
        self.leak_ec = self.rec.leaked_bits
        self.qber = self.rec.qber_corrected
        self._lap("reconciliation")
        if self.qber > self.cfg.qber_threshold:
            return self.abort(ALARM_QBER, f"key error rate {self.qber:.4f}")
        # 3. verification
        self._mark()
        try:
            ver = verify_keys(block.alice_key, corrected, self.channel, self.rng, self.eps_cor)
        except VerificationError as exc:
            return self.abort(ALARM_VERIFICATION, str(exc))
        self.leak_ver = ver.leaked_bits
        self.collision = ver.collision_bound
        self._lap("verification")
        # 4. secret key length with the leak actually counted on the channel
        length, reason = self._key_length(self.leak_ec + self.leak_ver)
        if length <= 0:
            return self.abort(ALARM_NO_KEY, reason)
        # 5. privacy amplification
        self._mark()
        try:
            ka, kb = amplify(block.alice_key, corrected, length, self.channel, family=self.cfg.pa_family)
        except PrivacyAmplificationError as exc:
            return self.abort(ALARM_PRIVACY_AMPLIFICATION, str(exc))
        self.pa = describe(self.cfg.pa_family, self.n, length)
        self._lap("privacy_amplification")
        self.timings["total"] = time.perf_counter() - t0
        return self._result(None, None, ka, kb, length)


def bbm92_key_length(
    block: BBM92Block, leak_bits: int, eps_sec: float, eps_cor: float
) -> tuple[int, str | None]:
    """Entanglement-based finite-key length of a block (:func:`.finite_key.bbm92_secret_key_length`)."""
    n = int(block.alice_key.shape[0])
    k = int(block.coincidences[1, 1])
    return bbm92_secret_key_length(n, k, int(block.errors[1, 1]), leak_bits, eps_sec, eps_cor)


def _test_qber(block: BB84Block | BBM92Block) -> float:
    if isinstance(block, BB84Block):
        return block.x_errors / block.x_detected if block.x_detected else math.nan
    return block.qber_x


def _statistics_payload(block: BB84Block | BBM92Block) -> bytes:
    data: dict[str, Any]
    if isinstance(block, BB84Block):
        data = {
            "sent": block.sent.tolist(),
            "detected": block.detected.tolist(),
            "errors": block.errors.tolist(),
        }
    else:
        data = {
            "sent": block.sent.tolist(),
            "coincidences": block.coincidences.tolist(),
            "errors": block.errors.tolist(),
            "chsh_s": block.chsh_s,
        }
    data["sifted_bits"] = int(block.alice_key.shape[0])
    return json.dumps(data, sort_keys=True).encode()
