"""Bad input: each gets a clear ETSI Error body with the right status, and nothing is lost."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from kms.crypto import pki
from kms.lab.launcher import client_ssl_context
from tests.kme_harness import RunningKme

M, S, T = "SAE-M", "SAE-S", "SAE-T"


def _error(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) <= {"message", "details"}
    assert "Traceback" not in resp.text and 'detail"' not in resp.text
    return body  # type: ignore[no-any-return]


def _stored(kme: RunningKme) -> int:
    return int(kme.client(M).get(f"/api/v1/keys/{S}/status").json()["stored_key_count"])


def _key_rows(kme: RunningKme) -> int:
    """Key rows in the store: what a request that is refused must not add. (The pool's available
    count is no measure of that: the filler keeps topping the pool up meanwhile.)"""
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM keys")).scalar_one())
    finally:
        engine.dispose()


def _enc(kme: RunningKme, **body: object) -> httpx.Response:
    return kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json=body)


def test_size_not_multiple_of_8_exact_message(kme: RunningKme) -> None:
    for resp in (_enc(kme, size=100), kme.client(M).get(f"/api/v1/keys/{S}/enc_keys", params={"size": 257})):
        assert _error(resp, 400)["message"] == "size shall be a multiple of 8"


@pytest.mark.parametrize("size", [8, 56, 4104, 65536])
def test_size_out_of_range(kme: RunningKme, size: int) -> None:
    body = _error(_enc(kme, size=size), 400)
    assert "min_key_size" in str(body["message"]) and "bits" in str(body["message"])


@pytest.mark.parametrize("number", [0, -1, 129, 10**9])
def test_number_out_of_range(kme: RunningKme, number: int) -> None:
    _error(_enc(kme, number=number), 400)


@pytest.mark.parametrize("value", ["3", 1.5, True, None, [1], {"n": 1}])
def test_number_of_wrong_type(kme: RunningKme, value: object) -> None:
    if value is None:
        assert _enc(kme, number=value).status_code == 200  # null means "use the default"
        return
    body = _error(_enc(kme, number=value), 400)
    assert body["details"]


@pytest.mark.parametrize("query", [{"number": "abc"}, {"number": "1.5"}, {"size": "x"}])
def test_query_parameters_of_wrong_type(kme: RunningKme, query: dict[str, str]) -> None:
    _error(kme.client(M).get(f"/api/v1/keys/{S}/enc_keys", params=query), 400)


def test_post_only_fields_in_query_are_refused(kme: RunningKme) -> None:
    resp = kme.client(M).get(f"/api/v1/keys/{S}/enc_keys", params={"additional_slave_SAE_IDs": T})
    assert "POST" in str(_error(resp, 400)["message"])


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"[1,2]", b'"string"', b"\xff\xfe", b'{"number": 1,}', b'{"size": "256"}']
)
def test_malformed_or_mistyped_json(kme: RunningKme, raw: bytes) -> None:
    resp = kme.client(M).post(
        f"/api/v1/keys/{S}/enc_keys", content=raw, headers={"content-type": "application/json"}
    )
    _error(resp, 400)


@pytest.mark.parametrize(
    "body",
    [
        {"key_IDs": "abc"},
        {"key_IDs": [{"no_key_id": 1}]},
        {"key_IDs": [{"key_ID": 5}]},
        {},
        {"key_IDs": []},
    ],
)
def test_dec_keys_malformed_bodies(kme: RunningKme, body: dict[str, object]) -> None:
    _error(kme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json=body), 400)


def test_wrong_type_for_additional_slaves(kme: RunningKme) -> None:
    _error(_enc(kme, additional_slave_SAE_IDs=T), 400)
    _error(_enc(kme, additional_slave_SAE_IDs=[1, 2]), 400)


@pytest.mark.parametrize("endpoint", ["status", "enc_keys", "dec_keys"])
def test_unknown_sae_in_path(kme: RunningKme, endpoint: str) -> None:
    client = kme.client(M)
    if endpoint == "dec_keys":
        resp = client.get(
            "/api/v1/keys/SAE-NOBODY/dec_keys", params={"key_ID": "9b0e1d43-0a7e-4c7a-9f53-1f0f0e2b2d11"}
        )
    else:
        resp = client.get(f"/api/v1/keys/SAE-NOBODY/{endpoint}")
    assert "unknown" in str(_error(resp, 400)["message"])


def test_master_cannot_name_itself_as_slave(kme: RunningKme) -> None:
    _error(kme.client(M).get(f"/api/v1/keys/{M}/enc_keys"), 400)


def test_too_many_additional_slaves(kme: RunningKme) -> None:
    extra = ["SAE-T", "SAE-U", "SAE-V", "SAE-W", "SAE-X"]
    body = _error(_enc(kme, additional_slave_SAE_IDs=extra), 400)
    assert "max_SAE_ID_count" in str(body["message"])


def test_unknown_and_duplicate_additional_slaves(kme: RunningKme) -> None:
    _error(_enc(kme, additional_slave_SAE_IDs=["SAE-NOBODY"]), 400)
    _error(_enc(kme, additional_slave_SAE_IDs=[T, T]), 400)
    _error(_enc(kme, additional_slave_SAE_IDs=[S]), 400)


def test_unknown_key_id(kme: RunningKme) -> None:
    for key_id in ("9b0e1d43-0a7e-4c7a-9f53-1f0f0e2b2d11", "not-a-uuid"):
        resp = kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key_id})
        assert _error(resp, 400)["message"] == "one or more keys specified are not found on KME"


def test_missing_key_id_query(kme: RunningKme) -> None:
    _error(kme.client(S).get(f"/api/v1/keys/{M}/dec_keys"), 400)


def test_already_consumed_key(kme: RunningKme) -> None:
    key_id = _enc(kme).json()["keys"][0]["key_ID"]
    fresh = _enc(kme).json()["keys"][0]["key_ID"]
    assert kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key_id}).status_code == 200
    # With a fresh key beside it the request is no retry (which the redelivery window would answer):
    # the consumed key is refused, and the fresh one is not served either.
    resp = kme.client(S).post(
        f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": key_id}, {"key_ID": fresh}]}
    )
    body = _error(resp, 400)
    assert body["message"] == "one or more keys specified are not found on KME"
    assert body["details"] == [{"key_ID": key_id, "reason": "key is consumed"}]
    assert kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": fresh}).status_code == 200


def test_wrong_master_in_path_is_not_found(kme: RunningKme) -> None:
    key_id = _enc(kme).json()["keys"][0]["key_ID"]
    resp = kme.client(S).get(f"/api/v1/keys/{T}/dec_keys", params={"key_ID": key_id})
    _error(resp, 400)
    assert kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key_id}).status_code == 200


def test_slave_asking_for_another_slaves_keys_gets_401_and_nothing_is_lost(kme: RunningKme) -> None:
    keys = _enc(kme, number=2).json()["keys"]
    ids = [k["key_ID"] for k in keys]
    resp = kme.client(T).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]})
    _error(resp, 401)
    got = kme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]})
    assert {k["key_ID"]: k["key"] for k in got.json()["keys"]} == {k["key_ID"]: k["key"] for k in keys}


def test_mixed_valid_and_unknown_ids_serve_nothing(kme: RunningKme) -> None:
    key = _enc(kme).json()["keys"][0]
    bogus = "9b0e1d43-0a7e-4c7a-9f53-1f0f0e2b2d11"
    resp = kme.client(S).post(
        f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]}, {"key_ID": bogus}]}
    )
    assert _error(resp, 400)["details"] == [{"key_ID": bogus}]
    again = kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key["key_ID"]})
    assert again.json()["keys"] == [key]


def test_failed_requests_take_nothing_from_the_pool(kme: RunningKme) -> None:
    before = _stored(kme)
    for body in ({"size": 100}, {"number": 0}, {"number": 1, "extension_mandatory": [{"x_y": 1}]}):
        assert _enc(kme, **body).status_code == 400
    assert _stored(kme) >= before


def test_unknown_path_and_method_answer_error_format(kme: RunningKme) -> None:
    _error(kme.client(M).get("/api/v1/keys/SAE-S/nothing"), 400)
    _error(kme.client(M).get("/"), 400)
    _error(kme.client(M).delete(f"/api/v1/keys/{S}/enc_keys"), 400)
    _error(kme.client(M).put(f"/api/v1/keys/{S}/status"), 400)


def test_certificate_from_another_ca_is_refused_at_handshake(kme: RunningKme, tmp_path: Path) -> None:
    other_ca = pki.create_ca("Some other CA")
    rogue = pki.issue_client_cert(other_ca, M)
    pki.write_credential(rogue, tmp_path / "r.pem", tmp_path / "r.key")
    ctx = client_ssl_context(kme.ca, tmp_path / "r.pem", tmp_path / "r.key")
    with (
        httpx.Client(base_url=kme.process.base_url, verify=ctx) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)),
    ):
        client.get(f"/api/v1/keys/{S}/status")


def test_no_client_certificate_is_refused_at_handshake(kme: RunningKme) -> None:
    ctx = client_ssl_context(kme.ca, None, None)
    with (
        httpx.Client(base_url=kme.process.base_url, verify=ctx) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)),
    ):
        client.get(f"/api/v1/keys/{S}/status")


def test_plain_http_is_not_served(kme: RunningKme) -> None:
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{kme.process.port}") as client,
        pytest.raises(httpx.HTTPError),
    ):
        resp = client.get(f"/api/v1/keys/{S}/status")
        resp.raise_for_status()


def test_oversized_bodies_are_refused_before_they_are_read_whole(kme: RunningKme) -> None:
    before = _key_rows(kme)
    big = b'{"key_IDs": [' + b'{"key_ID": "9b0e1d43-0a7e-4c7a-9f53-1f0f0e2b2d11"},' * 40_000 + b"{}]}"
    declared = kme.client(S).post(
        f"/api/v1/keys/{M}/dec_keys", content=big, headers={"content-type": "application/json"}
    )
    assert "larger than" in str(_error(declared, 400)["message"])

    def chunks() -> object:  # no Content-Length: counted as it streams in
        for _ in range(64):
            yield b" " * 65536

    streamed = kme.client(M).post(
        f"/api/v1/keys/{S}/enc_keys", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "larger than" in str(_error(streamed, 400)["message"])
    assert _key_rows(kme) == before


def test_the_lean_path_and_the_framework_path_answer_alike(kme: RunningKme) -> None:
    """An ordinary POST takes the lean path (kms.api.hot_path); the same POST with a query string
    goes through FastAPI. Both must give the same answers, successes and refusals."""
    client = kme.client(M)
    by_path: dict[str, list[tuple[int, str]]] = {}
    for suffix in ("", "?via=framework"):
        url = f"/api/v1/keys/{S}/enc_keys{suffix}"
        ok = client.post(url, json={"number": 2, "size": 128})
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        assert [len(k["key"]) for k in ok.json()["keys"]] == [24, 24]
        ids = [k["key_ID"] for k in ok.json()["keys"]]
        fetched = kme.client(S).post(
            f"/api/v1/keys/{M}/dec_keys{suffix}", json={"key_IDs": [{"key_ID": i} for i in ids]}
        )
        assert fetched.json() == ok.json()
        # ids[0] alone would be a retry inside the redelivery window (served again); beside a fresh
        # key it is refused as consumed.
        fresh = client.post(url, json={"number": 1, "size": 128}).json()["keys"][0]["key_ID"]
        refused = [
            client.post(url, json={"size": 100}),
            client.post(url, json={"number": 1, "extension_mandatory": [{"x": 1}]}),
            kme.client(S).post(
                f"/api/v1/keys/{M}/dec_keys{suffix}",
                json={"key_IDs": [{"key_ID": ids[0]}, {"key_ID": fresh}]},
            ),
            kme.client(T).post(f"/api/v1/keys/{M}/dec_keys{suffix}", json={"key_IDs": [{"key_ID": ids[0]}]}),
        ]
        by_path[suffix] = [(r.status_code, r.text.replace(ids[0], "<key_ID>")) for r in refused]
    assert by_path[""] == by_path["?via=framework"]
    assert [status for status, _ in by_path[""]] == [400, 400, 400, 401]
