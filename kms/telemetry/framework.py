"""FastAPI's own OpenTelemetry hooks, switched off (docs/DECISIONS.md D-32, amended for issue 14).

Recent FastAPI releases carry them, on unless told otherwise: unconfigured they still read the
environment on every request (~2 % of a KME's CPU in ``bench_two_site.py``), and configured by the
environment they would export spans naming request paths (SAE IDs) to a collector this design does
not know of. The KME's telemetry is its Prometheus metrics and structlog lines."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI


def native_telemetry_off() -> dict[str, Any]:
    """Keyword arguments for ``FastAPI(...)``: the hooks off where the release has them, else none."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
