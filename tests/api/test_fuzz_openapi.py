"""Property-based fuzzing of the key delivery API from the OpenAPI document the KME itself publishes.

The schema is fetched over mTLS from the running server (``GET /openapi.json``); schemathesis turns
every operation into a Hypothesis strategy, in both its positive mode (requests the schema accepts)
and its negative mode (requests that violate it: wrong types, out-of-range lengths, broken bodies).
Half the cases name a registered peer SAE in the path, so that they get past the SAE lookup and
reach size, number, body and key_ID validation; the other half use whatever path the strategy made.

Every answer must be one the standard defines (200, 400, 401 or 503, never a 5xx other than 503),
``application/json``, and match the documented schema: Status or KeyContainer for 200, an ETSI
Error ``{"message": <string>, ...}`` otherwise (never a framework ``{"detail": ...}``).
Seeds are derandomised so that CI sees the same cases on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.transport import Response

from kms.provision.workdir import sae_credential_paths
from tests.kme_harness import RunningKme

MASTER, SLAVE = "SAE-M", "SAE-S"
ETSI_STATUS_CODES = {200, 400, 401, 503}
EXAMPLES_PER_MODE = 50  # x2 modes -> 100 cases per operation and backend

# operationId -> (calling SAE, path parameter name, registered peer to name in the path)
OPERATIONS: dict[str, tuple[str, str, str]] = {
    "getStatus": (MASTER, "slave_SAE_ID", SLAVE),
    "getKeyGet": (MASTER, "slave_SAE_ID", SLAVE),
    "getKeyPost": (MASTER, "slave_SAE_ID", SLAVE),
    "getKeyWithKeyIdsGet": (SLAVE, "master_SAE_ID", MASTER),
    "getKeyWithKeyIdsPost": (SLAVE, "master_SAE_ID", MASTER),
}


@pytest.fixture(scope="module")
def openapi_doc(kme: RunningKme) -> dict[str, Any]:
    resp = kme.client(MASTER).get("/openapi.json")
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


@pytest.fixture(scope="module")
def sessions(kme: RunningKme) -> Iterator[dict[str, requests.Session]]:
    """One keep-alive requests session per calling SAE, presenting that SAE's client certificate."""
    out: dict[str, requests.Session] = {}
    for sae in (MASTER, SLAVE):
        session = requests.Session()
        cert, key = sae_credential_paths(kme.workdir, sae)
        session.cert = (str(cert), str(key))
        session.verify = str(kme.ca)
        out[sae] = session
    yield out
    for session in out.values():
        session.close()


def test_schema_lists_every_operation(openapi_doc: dict[str, Any]) -> None:
    """Guards the fuzzing below against silently testing nothing if the document changes."""
    ids = {op.get("operationId") for methods in openapi_doc["paths"].values() for op in methods.values()}
    assert set(OPERATIONS) <= ids
    for methods in openapi_doc["paths"].values():
        for op in methods.values():
            assert set(op["responses"]) <= {"200", "400", "401", "503"}, op["operationId"]


def _content_type(response: Response) -> str:
    for name, value in response.headers.items():
        if name.lower() == "content-type":
            return value[0] if isinstance(value, list) else str(value)
    return ""


def check_response(case: schemathesis.Case[Any], response: Response) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.content[:300]!r}"
    assert response.status_code in ETSI_STATUS_CODES, f"status outside ETSI GS QKD 014: {where}"
    assert _content_type(response).startswith("application/json"), f"not JSON: {where}"
    body = response.json()
    assert isinstance(body, dict), where
    if response.status_code == 200:
        assert "message" not in body, where
    else:
        assert isinstance(body.get("message"), str), f"not an ETSI Error body: {where}"
        assert "detail" not in body, f"framework error body leaked: {where}"
    # The documented schema: Status / KeyContainer for 200, Error for 400/401/503.
    case.operation.validate_response(response, case=case)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("operation_id", list(OPERATIONS))
def test_fuzz_operation(
    kme: RunningKme,
    openapi_doc: dict[str, Any],
    sessions: dict[str, requests.Session],
    operation_id: str,
    mode: GenerationMode,
) -> None:
    schema = schemathesis.openapi.from_dict(openapi_doc)
    operation = schema.find_operation_by_id(operation_id)
    caller, path_param, peer = OPERATIONS[operation_id]
    strategy = st.one_of(
        operation.as_strategy(generation_mode=mode),
        operation.as_strategy(generation_mode=mode, path_parameters={path_param: peer}),
    )
    session = sessions[caller]
    base_url = kme.process.base_url
    seen: set[int] = set()

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=strategy)
    def fuzz(case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=base_url, session=session, verify=session.verify, timeout=15)
        seen.add(response.status_code)
        check_response(case, response)

    fuzz()
    assert seen, "no request was sent"
    if mode is GenerationMode.NEGATIVE:
        assert 400 in seen, f"negative cases never got a 400: {sorted(seen)}"
