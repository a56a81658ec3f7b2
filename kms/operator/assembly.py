"""Builds a KME process's operator listener from its runtime (``kms.server.build_app``)."""

from __future__ import annotations

from collections.abc import Callable

from kms.operator.app import create_operator_app, load_token
from kms.operator.console.routes import Console
from kms.operator.exposition import Exposition
from kms.operator.listener import OperatorListener
from kms.operator.peer_metrics import count_peer_calls
from kms.runtime.assembly import Runtime
from kms.service.audit_queries import AuditService
from kms.service.console_actions import ConsoleActions
from kms.service.console_auth import ConsoleAuth
from kms.service.console_view import ConsoleView
from kms.service.database_probe import DatabaseProbe
from kms.service.operator_health import HealthService
from kms.service.operator_metrics import OperatorMetrics
from kms.telemetry.metrics import Instruments


def build_operator_listener(
    runtime: Runtime, role: Callable[[], str], processes: int, instruments: Instruments
) -> OperatorListener:
    """``role``: this process's part ("leader" fills the pool, "standby" does not); ``processes``:
    how many processes serve the KME (they contend for the operator port when more than one).
    Every process counts its own messages to peers; the one serving the port reports which
    adjacent peers its client finds down."""
    settings = runtime.settings
    peers_down: Callable[[], frozenset[str]] = frozenset
    if runtime.network is not None:
        count_peer_calls(runtime.network.client, instruments, {p.kme_id for p in settings.peers})
        peers_down = runtime.network.client.down_peers
    health = HealthService(runtime.db, runtime.envelope, settings, role)
    metrics = OperatorMetrics(runtime.db, settings)
    exposition = Exposition(metrics, settings, processes, peers_down)
    section = settings.operator
    console = build_console(runtime, metrics, peers_down) if section.console and section.tls else None
    refused = section.console and not section.tls
    app = create_operator_app(health, exposition, load_token(section), console, refused)
    return OperatorListener(settings, app, shared_port=processes > 1)


def build_console(
    runtime: Runtime, metrics: OperatorMetrics, peers_down: Callable[[], frozenset[str]]
) -> Console:
    """The web console's services (D-36), over the same figures as ``/metrics``."""
    db, settings = runtime.db, runtime.settings
    auth = ConsoleAuth(db, settings.operator)
    view = ConsoleView(db, settings, metrics, AuditService.for_settings(db, runtime.identity, settings))
    probe = DatabaseProbe(db, settings.operator.health_timeout_seconds)
    return Console(settings, auth, view, ConsoleActions(db, auth, view), peers_down, probe)
