"""What a console user may change, and the audited provenance lookup (DECISIONS.md D-36).

Suspending and resuming a link go through the same use case as ``qkms link suspend|resume``
(``kms.service.links``), which audits ``link.suspended``/``link.resumed``; the console adds its
own ``console.action`` record naming the account and the outcome. Auditors read only: their
attempt is refused here and audited as ``console.refused``.
"""

from __future__ import annotations

from typing import Any

from kms.service import audit_recorder, links
from kms.service.console_auth import ConsoleAuth, Viewer
from kms.service.console_view import ConsoleView
from kms.storage.database import Database

OPERATOR_ROLE = "operator"


class ActionRefused(Exception):
    """The viewer may not do this; the message is the page's."""


class ConsoleActions:
    def __init__(self, db: Database, auth: ConsoleAuth, view: ConsoleView) -> None:
        self.db = db
        self.auth = auth
        self.view = view

    def link(self, viewer: Viewer, link_id: str, verb: str, reason: str) -> str:
        """Suspend or resume (``verb``) ``link_id``; the outcome as one line. ``ActionRefused`` for
        an auditor; ``links.LinkStateError`` when the link is not in the state the verb starts from."""
        action = f"link.{verb}"
        if viewer.role != OPERATOR_ROLE:
            self.auth.refuse(viewer, action, "auditors read only")
            raise ActionRefused(
                f"{viewer.account} is an auditor: auditors read only and cannot {verb} a link"
            )
        why = f"console {viewer.account}: {reason.strip()[:200] or 'no reason given'}"
        try:
            if verb == "suspend":
                change = links.suspend(self.db, link_id, why)
            else:
                change = links.resume(self.db, link_id, why, discard=False)
        except links.LinkStateError as exc:
            self._record(viewer, action, link_id, {"outcome": "refused", "reason": str(exc)})
            raise
        self._record(viewer, action, link_id, {"outcome": "ok", "blocks": change.blocks, "keys": change.keys})
        return f"link {link_id} {verb}{'ed' if verb == 'suspend' else 'd'}: {change.blocks} blocks, {change.keys} keys"

    def provenance(self, viewer: Viewer, key_id: str) -> dict[str, Any] | None:
        found = self.view.provenance(key_id)
        self._record(viewer, "audit.provenance", key_id, {"found": found is not None})
        return found

    def _record(self, viewer: Viewer, action: str, subject: str, data: dict[str, Any]) -> None:
        audit_recorder.append_alone(
            self.db, [(viewer.actor, "console.action", subject, {"action": action, **data})]
        )
