"""Builds a KME process's operator listener from its runtime (``kms.server.build_app``)."""

from __future__ import annotations

from collections.abc import Callable

from kms.operator.app import create_operator_app, load_token
from kms.operator.exposition import Exposition
from kms.operator.listener import OperatorListener
from kms.runtime.assembly import Runtime
from kms.service.operator_health import HealthService
from kms.service.operator_metrics import OperatorMetrics


def build_operator_listener(runtime: Runtime, role: Callable[[], str], processes: int) -> OperatorListener:
    """``role``: this process's part ("leader" fills the pool, "standby" does not); ``processes``:
    how many processes serve the KME (they contend for the operator port when more than one)."""
    settings = runtime.settings
    health = HealthService(runtime.db, runtime.envelope, settings, role)
    exposition = Exposition(OperatorMetrics(runtime.db, settings), settings, processes)
    app = create_operator_app(health, exposition, load_token(settings.operator))
    return OperatorListener(settings, app, shared_port=processes > 1)
