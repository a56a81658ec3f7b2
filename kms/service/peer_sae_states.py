"""An SAE's state across sites (DECISIONS.md D-39): the units behind ``sae.state``.

At the SAE's home KME, ``qkms sae suspend|resume|revoke`` changes the SAE (``sae_lifecycle``), then
tells every peer KME (``kms.peer.sae_notices``) and records who was told and what each did
(``sae.peer_told``). At a peer KME, :func:`apply` records the home KME's signed statement in the
registry as a ``managed_by = 'peer'`` row, which overrides the bundle's entry in every process within
``sae_registry.refresh_ms``: no ledger entry naming the SAE is recorded any more, and no local master
may ask for keys for it. A revocation also destroys, in the same transaction, every key the SAE's
pairs could still fetch here (the keys its home KME made with it as master and recorded here for the
slaves here, not yet fetched) and zeroises the redelivery copies of those fetched, each key a
``destroyed`` lifecycle event; :func:`sweep` does it once more after the propagation interval, for an
entry checked against the registry just before it changed. Suspension touches no key (D-29).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kms.domain.saes import SaeState, peer_notice_applies
from kms.service import audit_recorder
from kms.service.peer_context import Received, remember
from kms.storage import registry_repository as registry
from kms.storage.database import Database

# The audit action at a peer KME for each state its home KME reports.
PEER_ACTIONS = {
    SaeState.SUSPENDED: "sae.peer_suspended",
    SaeState.ACTIVE: "sae.peer_resumed",
    SaeState.REVOKED: "sae.peer_revoked",
}


class SaeNoticeError(Exception):
    """No notice can be made for this SAE here (unknown, or served by another KME)."""


@dataclass(frozen=True)
class SaeNotice:
    """What a home KME states about one of its SAEs: its state since ``changed_at`` (home clock)."""

    sae_id: str
    state: SaeState
    reason: str
    changed_at: datetime

    def body(self) -> dict[str, str]:
        return {
            "sae_id": self.sae_id,
            "state": self.state.value,
            "reason": self.reason[:512],
            "changed_at": self.changed_at.isoformat(),
        }

    @classmethod
    def parse(cls, b: Any) -> SaeNotice:
        """A notice from a message body; ``ValueError`` if malformed."""
        if not isinstance(b, dict):
            raise ValueError("an SAE notice is an object")
        changed_at = datetime.fromisoformat(str(b["changed_at"]))
        if changed_at.tzinfo is None:
            raise ValueError("changed_at must carry its time zone")
        return cls(str(b["sae_id"]), SaeState(str(b["state"])), str(b.get("reason", ""))[:512], changed_at)


@dataclass(frozen=True)
class Applied:
    sae_id: str
    state: SaeState
    changed: bool
    keys_destroyed: int = 0
    redelivery_zeroised: int = 0

    def reply(self) -> dict[str, Any]:
        return {
            "sae_id": self.sae_id,
            "state": self.state.value,
            "changed": self.changed,
            "keys_destroyed": self.keys_destroyed,
            "redelivery_zeroised": self.redelivery_zeroised,
        }


def notices_of(
    db: Database, kme_id: str, sae_ids: Sequence[str] | None = None, every_changed: bool = False
) -> list[SaeNotice]:
    """This KME's statements about its own SAEs: the ones named, or every one not active, or with
    ``every_changed`` every one a ``qkms sae`` command changed (resumed ones too: the periodic re-send)."""
    with db.read() as conn:
        records = [r for r in registry.sae_records(conn) if r.role == "sae" and r.managed_by != "peer"]
    by_id = {r.sae_id: r for r in records if r.kme_id == kme_id}
    if every_changed:
        chosen = [r for r in by_id.values() if r.managed_by == "cli" or r.state is not SaeState.ACTIVE]
    elif sae_ids is None:
        chosen = [r for r in by_id.values() if r.state is not SaeState.ACTIVE]
    else:
        missing = [s for s in sae_ids if s not in by_id]
        if missing:
            raise SaeNoticeError(f"no SAE {missing[0]!r} is served by this KME")
        chosen = [by_id[s] for s in sae_ids]
    return [SaeNotice(r.sae_id, r.state, r.reason or "", utc(r.updated_at)) for r in chosen]


def utc(at: datetime | None) -> datetime:
    """SQLite hands back naive datetimes (every stored time is UTC); a configured SAE has none."""
    if at is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def apply(
    db: Database, message: Received, home: str, fingerprints: dict[str, str], notices: Sequence[SaeNotice]
) -> list[Applied]:
    """Record what KME ``home`` (the sender) states about its SAEs, in one transaction with the
    message's replay check; ``fingerprints``: each SAE's registry placeholder here."""
    now = datetime.now(UTC)
    actor = f"kme:{home}"
    out: list[Applied] = []
    with db.write() as conn:
        remember(conn, message)
        changed = False
        for n in notices:
            held = registry.remote_state(conn, n.sae_id)
            if not peer_notice_applies(held, n.state, n.changed_at):
                out.append(Applied(n.sae_id, held[0] if held else SaeState.ACTIVE, False))
                continue
            registry.set_remote_state(
                conn, n.sae_id, home, fingerprints[n.sae_id], n.state, n.reason, n.changed_at
            )
            destroyed = zeroised = 0
            if n.state is SaeState.REVOKED:
                destroyed, zeroised = registry.destroy_keys_of(
                    conn, n.sae_id, now, actor, f"SAE {n.sae_id} revoked at {home}"
                )
            data: dict[str, Any] = {
                "home": home,
                "from": (held[0] if held else SaeState.ACTIVE).value,
                "reason": n.reason,
                "changed_at": n.changed_at.isoformat(),
            }
            if n.state is SaeState.REVOKED:
                data |= {"keys_destroyed": destroyed, "redelivery_zeroised": zeroised}
            audit_recorder.record(conn, actor, PEER_ACTIONS[n.state], n.sae_id, data, now)
            out.append(Applied(n.sae_id, n.state, True, destroyed, zeroised))
            changed = True
        if changed:
            registry.bump_version(conn)
    return out


def sweep(db: Database, home: str, sae_id: str) -> tuple[int, int]:
    """Once the propagation interval has passed after a revocation recorded by :func:`apply`: destroy
    keys an entry checked just before the change recorded meanwhile (``sae.peer_revoked_sweep``)."""
    now = datetime.now(UTC)
    actor = f"kme:{home}"
    with db.write() as conn:
        held = registry.remote_state(conn, sae_id)
        if held is None or held[0] is not SaeState.REVOKED:
            return 0, 0
        destroyed, zeroised = registry.destroy_keys_of(
            conn, sae_id, now, actor, f"SAE {sae_id} revoked at {home}"
        )
        if destroyed or zeroised:
            data = {"home": home, "keys_destroyed": destroyed, "redelivery_zeroised": zeroised}
            audit_recorder.record(conn, actor, "sae.peer_revoked_sweep", sae_id, data, now)
    return destroyed, zeroised


def record_told(db: Database, notice: SaeNotice, outcomes: dict[str, dict[str, Any]]) -> None:
    """At the home KME: which peers were told of ``notice`` and what each did (``sae.peer_told``)."""
    data = {"state": notice.state.value, "peers": outcomes}
    audit_recorder.append_alone(db, [("operator", "sae.peer_told", notice.sae_id, data)])


def adopt_after_restore(db: Database, kme_id: str, reports: dict[str, list[Any]]) -> list[str]:
    """At a KME just restored from a backup: what its peers hold about its SAEs (their answers to
    ``store.restored``). A revocation or suspension they hold that is newer than this store's state
    was lost with the history after the snapshot: it is made again here (``sae.revoked`` /
    ``sae.suspended``, the reason naming the peer), so a restore never revives a revoked SAE that a
    peer knew of. A resume is not adopted (the conservative direction). One line per change."""
    from kms.service import sae_lifecycle

    with db.read() as conn:
        own = {
            r.sae_id: r for r in registry.sae_records(conn) if r.kme_id == kme_id and r.managed_by != "peer"
        }
    changes: list[str] = []
    for peer, bodies in sorted(reports.items()):
        for body in bodies:
            notice = SaeNotice.parse(body)
            record = own.get(notice.sae_id)
            if record is None or notice.state is SaeState.ACTIVE or record.state is SaeState.REVOKED:
                continue
            if record.state is notice.state or notice.changed_at <= utc(record.updated_at):
                continue
            reason = (
                f"{notice.state.value} at {notice.changed_at.isoformat()} per KME {peer}'s record"
                f" (lost by the restore): {notice.reason}"
            )
            act = sae_lifecycle.revoke if notice.state is SaeState.REVOKED else sae_lifecycle.suspend
            try:
                change = act(db, kme_id, notice.sae_id, reason)
            except sae_lifecycle.SaeLifecycleError as exc:
                changes.append(
                    f"SAE {notice.sae_id}: KME {peer} holds it {notice.state.value}, not adopted: {exc}"
                )
                continue
            own[notice.sae_id] = replace(record, state=change.state, updated_at=datetime.now(UTC))
            changes.append(f"SAE {notice.sae_id} {notice.state.value} again ({reason})")
    return changes
