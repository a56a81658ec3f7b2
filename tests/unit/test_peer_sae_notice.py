"""Which peer notices about an SAE change what a KME holds (DECISIONS.md D-39): revocation is
final, an older notice never overrides a newer one, a repeated notice changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kms.domain.saes import SaeState, peer_notice_applies
from kms.service.peer_sae_states import SaeNotice

T0 = datetime(2026, 12, 5, 20, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("held", "told", "at", "applies"),
    [
        (None, SaeState.ACTIVE, T0, False),  # nothing held: the bundle already says active
        (None, SaeState.SUSPENDED, T0, True),
        (None, SaeState.REVOKED, T0, True),
        ((SaeState.SUSPENDED, T0), SaeState.ACTIVE, LATER, True),
        ((SaeState.SUSPENDED, LATER), SaeState.ACTIVE, T0, False),  # an older resume arriving late
        ((SaeState.SUSPENDED, T0), SaeState.SUSPENDED, LATER, False),
        ((SaeState.ACTIVE, T0), SaeState.REVOKED, LATER, True),
        ((SaeState.REVOKED, T0), SaeState.ACTIVE, LATER, False),  # revocation is final
        ((SaeState.REVOKED, T0), SaeState.SUSPENDED, LATER, False),
    ],
)
def test_peer_notice_applies(
    held: tuple[SaeState, datetime] | None, told: SaeState, at: datetime, applies: bool
) -> None:
    assert peer_notice_applies(held, told, at) is applies


def test_notice_round_trips_and_refuses_bad_bodies() -> None:
    notice = SaeNotice("SAE-1", SaeState.REVOKED, "lost laptop", T0)
    assert SaeNotice.parse(notice.body()) == notice
    bad: object
    for bad in (
        [],
        {"sae_id": "SAE-1", "state": "gone", "changed_at": T0.isoformat()},
        {"sae_id": "SAE-1", "state": "revoked", "changed_at": "2026-12-05T20:00:00"},  # no time zone
        {"sae_id": "SAE-1", "state": "revoked"},
    ):
        with pytest.raises((ValueError, KeyError)):
            SaeNotice.parse(bad)
