"""Online KEK rotation and retirement (docs/DECISIONS.md D-27): the units of work of ``qkms kek``.

:meth:`KekRotation.start` makes a new version (same kind of source as the active one) and, in one
transaction, records it ``active`` and the old one ``draining``, audited ``kek.rotation_started``.
Every KME process picks the new version up within ``kek.refresh_seconds`` and seals with it from then
on. :meth:`KekRotation.reseal` then re-seals every record still under another version in bounded
batches, each batch its own short transaction, so key requests keep being served between them;
it repeats passes until none is left and the refresh window has passed (a process that had not yet
switched may still have sealed under the old version), then marks the old versions ``drained``,
audited ``kek.rotation_finished``. A crash anywhere leaves a consistent store (each record names the
version it is sealed under): running ``qkms kek rotate`` again resumes the unfinished rotation.
:meth:`KekRotation.retire` then retires a drained version (refused while anything is sealed under
it) and destroys what its reference points at.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kms.crypto import kek_sources
from kms.crypto.envelope import Envelope, KekError, MaterialIntegrityError, kek_check_value
from kms.service import audit_recorder
from kms.service.kek_keyring import (
    ACTIVE,
    DRAINED,
    DRAINING,
    RETIRED,
    load_version,
    record_parts,
    sync,
)
from kms.storage import kek_repository as repo
from kms.storage.database import Database


class KekRotationError(RuntimeError):
    """A rotation or retirement that cannot go ahead; the message is one line and nothing changed."""


@dataclass
class ResealReport:
    kek_id: str
    resumed: bool
    resealed: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0


class KekRotation:
    """Rotation and retirement for one KME's store, through its loaded envelope (keyring)."""

    def __init__(
        self,
        db: Database,
        envelope: Envelope,
        refresh_seconds: float,
        actor: str = "operator",
        batch: int = 256,
        pause_seconds: float = 0.0,
    ) -> None:
        self.db, self.envelope, self.actor = db, envelope, actor
        self.refresh_seconds = refresh_seconds
        self.batch, self.pause_seconds = batch, pause_seconds

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One rotation or retirement at a time per store (another one: a one-line refusal)."""
        try:
            with repo.rotation_lock(self.db):
                yield
        except repo.RotationBusy as exc:
            raise KekRotationError(str(exc)) from exc

    def versions(self) -> tuple[list[repo.VersionRow], dict[str, int]]:
        with self.db.read() as conn:
            return repo.versions(conn), repo.sealed_counts(conn)

    # -- start ------------------------------------------------------------------------------------
    def start(self, env_var: str | None = None) -> tuple[str, bool]:
        """(the version records are re-sealed to, whether an unfinished rotation is resumed)."""
        rows, _ = self.versions()
        for row in rows:  # every live version must load and be the recorded one: else change nothing
            if row.state != RETIRED:
                load_version(row)
        active = [r for r in rows if r.state == ACTIVE]
        if len(active) != 1:
            raise KekRotationError(
                f"the KEK keyring has {len(active)} active versions; exactly one is required"
            )
        if any(r.state == DRAINING for r in rows):
            if env_var is not None:
                raise KekRotationError(
                    f"a rotation to {active[0].kek_id} is unfinished; run `qkms kek rotate` without"
                    " --env-var to resume it first"
                )
            return active[0].kek_id, True
        kek_id = _next_id({r.kek_id for r in rows})
        ref = kek_sources.create(active[0].reference, kek_id, env_var)
        kek = kek_sources.load(ref)
        now = datetime.now(UTC)
        with self.db.write() as conn:
            current = repo.versions(conn)
            if [(r.kek_id, r.state) for r in current] != [(r.kek_id, r.state) for r in rows]:
                raise KekRotationError("the KEK keyring changed meanwhile (another rotation?); run it again")
            repo.insert_version(conn, kek_id, ref, kek_check_value(kek), ACTIVE, now)
            repo.set_state(conn, active[0].kek_id, DRAINING)
            audit_recorder.record(
                conn,
                self.actor,
                "kek.rotation_started",
                kek_id,
                {"from": active[0].kek_id, "source": ref["source"], "reference": kek_sources.describe(ref)},
                at=now,
            )
        self.envelope.add_version(kek_id, kek)
        sync(self.envelope, self.db)
        return kek_id, False

    # -- re-seal ------------------------------------------------------------------------------------
    def reseal(
        self, target: str, resumed: bool, progress: Callable[[str, int], None] | None = None
    ) -> ResealReport:
        """Re-seal every record under ``target`` in batches; finish the rotation when none is left."""
        if target not in self.envelope.versions:
            raise KekRotationError(f"KEK version {target} is not loaded in this process")
        report = ResealReport(target, resumed)
        began = time.monotonic()
        switched_at = time.monotonic()  # processes switch within refresh_seconds of this
        while True:
            moved = 0
            for table, _key, _column in repo.SEALED_TABLES:
                n = self._reseal_table(table, target, report, progress)
                moved += n
            waited = time.monotonic() - switched_at
            if moved == 0 and waited >= 2 * self.refresh_seconds and self._left(target) == 0:
                break
            if moved == 0:
                time.sleep(min(0.2, self.refresh_seconds))
        self._finish(target, report, time.monotonic() - began)
        report.seconds = time.monotonic() - began
        return report

    def _reseal_table(
        self, table: str, target: str, report: ResealReport, progress: Callable[[str, int], None] | None
    ) -> int:
        after: Any = None
        moved = 0
        while True:
            with self.db.write() as conn:
                rows = repo.reseal_batch(conn, table, after, target, self.batch)
                if not rows:
                    return moved
                sealer = self.envelope.writer()
                if sealer.kek_id != target:
                    raise KekRotationError(
                        f"this process seals under {sealer.kek_id}, not {target}: the keyring changed"
                    )
                out = []
                for row in rows:
                    try:
                        parts = [self.envelope.open(s, aad, row[-1]) for s, aad in record_parts(table, row)]
                    except MaterialIntegrityError as exc:
                        raise KekRotationError(
                            f"{table} row {row[0]} does not open under KEK version {row[-1]} (tampered, or"
                            " sealed under a version this process cannot load); rotation stopped, nothing"
                            " of this batch changed: run `qkms db check`"
                        ) from exc
                    aads = [aad for _s, aad in record_parts(table, row)]
                    out.append((row[0], b"".join(sealer.seal_many(parts, aads)), target))
                repo.store_resealed(conn, table, out)
            after = rows[-1][0]
            moved += len(rows)
            report.batches += 1
            report.resealed[table] = report.resealed.get(table, 0) + len(rows)
            if progress is not None:
                progress(table, len(rows))
            if self.pause_seconds:
                time.sleep(self.pause_seconds)

    def _left(self, target: str) -> int:
        with self.db.read() as conn:
            return sum(n for k, n in repo.sealed_counts(conn).items() if k != target)

    def _finish(self, target: str, report: ResealReport, seconds: float) -> None:
        now = datetime.now(UTC)
        with self.db.write() as conn:
            drained = [r.kek_id for r in repo.versions(conn) if r.state == DRAINING]
            for kek_id in drained:
                repo.set_state(conn, kek_id, DRAINED)
            audit_recorder.record(
                conn,
                self.actor,
                "kek.rotation_finished",
                target,
                {
                    "drained": drained,
                    "resealed": report.resealed,
                    "batches": report.batches,
                    "resumed": report.resumed,
                    "seconds": round(seconds, 3),
                },
                at=now,
            )

    # -- retire -------------------------------------------------------------------------------------
    def retire(self, kek_id: str, destroy: bool = True) -> str:
        """Retire a drained version: refused while anything is sealed under it. Returns what was
        done to its key (destroyed, or what the operator must do)."""
        now = datetime.now(UTC)
        with self.db.write() as conn:
            rows = {r.kek_id: r for r in repo.versions(conn)}
            row = rows.get(kek_id)
            if row is None:
                raise KekRotationError(f"no KEK version {kek_id!r} (see `qkms kek status`)")
            if row.state == RETIRED:
                raise KekRotationError(f"KEK version {kek_id} is already retired")
            if row.state == ACTIVE:
                raise KekRotationError(f"KEK version {kek_id} is the active one; rotate first")
            left = repo.sealed_counts(conn).get(kek_id, 0)
            if left or row.state == DRAINING:
                raise KekRotationError(
                    f"KEK version {kek_id} still seals {left} records (rotation unfinished);"
                    " run `qkms kek rotate` to finish it"
                )
            repo.set_state(conn, kek_id, RETIRED, now)
            audit_recorder.record(
                conn,
                self.actor,
                "kek.retired",
                kek_id,
                {"reference": kek_sources.describe(row.reference), "destroyed": destroy},
                at=now,
            )
        self.envelope.forget(kek_id)
        if not destroy:
            return f"kept {kek_sources.describe(row.reference)} (--keep-key)"
        try:
            return kek_sources.destroy(row.reference)
        except OSError as exc:
            raise KekError(
                f"KEK version {kek_id} is retired but {kek_sources.describe(row.reference)} could not be"
                f" destroyed: {exc.strerror}"
            ) from exc


def _next_id(taken: set[str]) -> str:
    n = len(taken) + 1
    while f"kek-{n}" in taken:
        n += 1
    return f"kek-{n}"
