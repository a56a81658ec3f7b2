"""ETSI GS QKD 014 conformance over real mTLS: every endpoint, verb, field and status code."""

from __future__ import annotations

import base64
import uuid

import pytest

from tests.kme_harness import RunningKme

M, S, T, U = "SAE-M", "SAE-S", "SAE-T", "SAE-U"
STATUS_FIELDS = {
    "source_KME_ID": str,
    "target_KME_ID": str,
    "master_SAE_ID": str,
    "slave_SAE_ID": str,
    "key_size": int,
    "stored_key_count": int,
    "max_key_count": int,
    "max_key_per_request": int,
    "max_key_size": int,
    "min_key_size": int,
    "max_SAE_ID_count": int,
}


def _keys(resp: object) -> list[dict[str, str]]:
    assert resp.status_code == 200, resp.text  # type: ignore[attr-defined]
    assert resp.headers["content-type"].startswith("application/json")  # type: ignore[attr-defined]
    body = resp.json()  # type: ignore[attr-defined]
    assert set(body) <= {"keys", "key_container_extension"}
    return body["keys"]  # type: ignore[no-any-return]


def _bits(key: dict[str, str]) -> int:
    return len(base64.b64decode(key["key"], validate=True)) * 8


def _fetch_post(kme: RunningKme, slave: str, master: str, ids: list[str]) -> dict[str, str]:
    keys = _keys(
        kme.client(slave).post(
            f"/api/v1/keys/{master}/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]}
        )
    )
    return {k["key_ID"]: k["key"] for k in keys}


def test_status_has_every_field(kme: RunningKme) -> None:
    resp = kme.client(M).get(f"/api/v1/keys/{S}/status")
    assert resp.status_code == 200
    body = resp.json()
    for name, typ in STATUS_FIELDS.items():
        assert isinstance(body[name], typ), name
    assert body["source_KME_ID"] == body["target_KME_ID"] == "KME-T"
    assert (body["master_SAE_ID"], body["slave_SAE_ID"]) == (M, S)
    assert body["min_key_size"] <= body["key_size"] <= body["max_key_size"]
    assert 0 < body["stored_key_count"] <= body["max_key_count"]
    assert body["max_SAE_ID_count"] == kme.settings.pool.max_sae_id_count
    assert isinstance(body["status_extension"], dict)


def test_get_key_get_defaults(kme: RunningKme) -> None:
    keys = _keys(kme.client(M).get(f"/api/v1/keys/{S}/enc_keys"))
    assert len(keys) == 1
    assert _bits(keys[0]) == kme.settings.pool.key_size
    assert uuid.UUID(keys[0]["key_ID"]).version == 7  # time-ordered (kms.domain.key_ids)


def test_get_key_get_with_query(kme: RunningKme) -> None:
    keys = _keys(kme.client(M).get(f"/api/v1/keys/{S}/enc_keys", params={"number": 3, "size": 512}))
    assert len(keys) == 3 and all(_bits(k) == 512 for k in keys)
    assert len({k["key_ID"] for k in keys}) == 3


def test_get_key_post_and_get_key_with_ids_both_verbs(kme: RunningKme) -> None:
    keys = _keys(kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 2, "size": 1024}))
    assert [_bits(k) for k in keys] == [1024, 1024]
    by_get = _keys(kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": keys[0]["key_ID"]}))
    assert by_get == [{"key_ID": keys[0]["key_ID"], "key": keys[0]["key"]}]
    by_post = _fetch_post(kme, S, M, [keys[1]["key_ID"]])
    assert by_post == {keys[1]["key_ID"]: keys[1]["key"]}


def test_the_keys_of_one_request_can_be_fetched_in_any_pieces(kme: RunningKme) -> None:
    # One request's keys are stored together (a key run); fetching them in pieces, out of order,
    # serves each exactly once.
    keys = _keys(kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 8}))
    ids = [k["key_ID"] for k in keys]
    expected = {k["key_ID"]: k["key"] for k in keys}
    for piece in ([ids[5]], [ids[7], ids[0]], [ids[3], ids[1], ids[6]], [ids[2], ids[4]]):
        assert _fetch_post(kme, S, M, piece) == {k: expected[k] for k in piece}
    # Consumed, yet inside the redelivery window (pool.redelivery_seconds, 60 s by default): the same
    # slave asking again gets the same key, not a fresh one (a retry after a lost answer).
    assert _fetch_post(kme, S, M, [ids[6]]) == {ids[6]: expected[ids[6]]}


def test_post_with_empty_body_uses_defaults(kme: RunningKme) -> None:
    client = kme.client(M)
    for kwargs in ({}, {"json": {}}, {"content": b"", "headers": {"content-type": "application/json"}}):
        keys = _keys(client.post(f"/api/v1/keys/{S}/enc_keys", **kwargs))
        assert len(keys) == 1 and _bits(keys[0]) == kme.settings.pool.key_size


def test_keys_are_distinct_and_identical_at_both_ends(kme: RunningKme) -> None:
    keys = _keys(kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 16, "size": 256}))
    assert len({k["key"] for k in keys}) == 16
    fetched = _fetch_post(kme, S, M, [k["key_ID"] for k in keys])
    assert fetched == {k["key_ID"]: k["key"] for k in keys}


def test_multicast_to_additional_slaves(kme: RunningKme) -> None:
    keys = _keys(
        kme.client(M).post(
            f"/api/v1/keys/{S}/enc_keys", json={"number": 2, "size": 256, "additional_slave_SAE_IDs": [T, U]}
        )
    )
    ids = [k["key_ID"] for k in keys]
    expected = {k["key_ID"]: k["key"] for k in keys}
    for slave in (S, T, U):
        assert _fetch_post(kme, slave, M, ids) == expected
        # Inside the redelivery window a slave already served gets the same key again.
        assert _fetch_post(kme, slave, M, ids[:1]) == {ids[0]: expected[ids[0]]}
    outsider = kme.client("SAE-V").post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": ids[0]}]})
    assert outsider.status_code == 401


def test_additional_slave_can_fetch_before_primary(kme: RunningKme) -> None:
    keys = _keys(kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"additional_slave_SAE_IDs": [T]}))
    key_id = keys[0]["key_ID"]
    assert _fetch_post(kme, T, M, [key_id]) == {key_id: keys[0]["key"]}
    assert _fetch_post(kme, S, M, [key_id]) == {key_id: keys[0]["key"]}


def test_unknown_fields_are_ignored(kme: RunningKme) -> None:
    body = {"number": 1, "additional_target_sae_ids": ["x"], "vendor_thing": {"a": 1}}
    keys = _keys(kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json=body))
    key_id = keys[0]["key_ID"]
    resp = kme.client(S).post(
        f"/api/v1/keys/{M}/dec_keys",
        json={"key_IDs": [{"key_ID": key_id, "master_SAE_ID": M}], "key_IDs_extension": {"x": 1}, "other": 2},
    )
    assert {k["key_ID"] for k in _keys(resp)} == {key_id}


def test_extension_optional_ignored(kme: RunningKme) -> None:
    body = {"number": 1, "extension_optional": [{"abc_route_type": "direct"}]}
    assert len(_keys(kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json=body))) == 1


def test_extension_mandatory_refused_with_exact_message(kme: RunningKme) -> None:
    before = kme.client(M).get(f"/api/v1/keys/{S}/status").json()["stored_key_count"]
    body = {"number": 1, "extension_mandatory": [{"abc_route_type": "direct"}]}
    resp = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json=body)
    assert resp.status_code == 400
    assert resp.json()["message"] == "not all extension_mandatory parameters are supported"
    after = kme.client(M).get(f"/api/v1/keys/{S}/status").json()["stored_key_count"]
    assert after >= before


def test_openapi_document_describes_the_endpoints(kme: RunningKme) -> None:
    doc = kme.client(M).get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/api/v1/keys/{slave_SAE_ID}/enc_keys"]) == {"get", "post"}
    assert set(paths["/api/v1/keys/{master_SAE_ID}/dec_keys"]) == {"get", "post"}
    assert set(paths["/api/v1/keys/{slave_SAE_ID}/status"]) == {"get"}
    for methods in paths.values():
        for op in methods.values():
            assert set(op["responses"]) == {"200", "400", "401", "503"}
    schemas = doc["components"]["schemas"]
    assert {"Status", "KeyRequest", "KeyIds", "KeyContainer", "Error"} <= set(schemas)
    assert "keys" in schemas["KeyContainer"]["properties"]


@pytest.mark.parametrize("path", ["/api/v1/keys/SAE-S/status", "/api/v1/keys/SAE-S/enc_keys"])
def test_unregistered_certificate_gets_401_error_body(kme: RunningKme, path: str, tmp_path: object) -> None:
    from pathlib import Path

    from kms.crypto import pki

    ca = pki.load_credential(kme.workdir / "pki" / "ca.pem", kme.workdir / "pki" / "ca.key")
    stranger = pki.issue_client_cert(ca, "SAE-STRANGER")
    d = Path(str(tmp_path))
    pki.write_credential(stranger, d / "s.pem", d / "s.key")
    with kme.process.client(kme.ca, d / "s.pem", d / "s.key") as client:
        resp = client.get(path)
    assert resp.status_code == 401
    assert set(resp.json()) == {"message"}


def test_certificate_with_registered_cn_but_other_key_is_refused(kme: RunningKme, tmp_path: object) -> None:
    from pathlib import Path

    from kms.crypto import pki

    ca = pki.load_credential(kme.workdir / "pki" / "ca.pem", kme.workdir / "pki" / "ca.key")
    impostor = pki.issue_client_cert(ca, M)  # right CN, wrong (unpinned) certificate
    d = Path(str(tmp_path))
    pki.write_credential(impostor, d / "i.pem", d / "i.key")
    with kme.process.client(kme.ca, d / "i.pem", d / "i.key") as client:
        resp = client.get(f"/api/v1/keys/{S}/enc_keys")
    assert resp.status_code == 401
    assert "message" in resp.json()
