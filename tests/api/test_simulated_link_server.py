"""The KME fed by the full-physics simulated link: provenance, and an attacked link's alarm and fallback."""

from __future__ import annotations

import time
from pathlib import Path

from kms.provision.workdir import auditor_credential_paths
from tests.kme_harness import running_kme

M, S, AUD = "SAE-M", "SAE-S", "AUD"


def test_keys_from_the_simulated_link_carry_full_provenance(tmp_path: Path) -> None:
    with running_kme(
        tmp_path / "kme",
        None,
        saes=(M, S),
        auditors=(AUD,),
        link_source="simulated",
        link_options={"pacing": "fast", "seed": 11},
        fill_keys=8,
    ) as kme:
        key = kme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0]
        cert, pem_key = auditor_credential_paths(kme.workdir, AUD)
        with kme.process.client(kme.ca, cert, pem_key) as auditor:
            prov = auditor.get(f"/api/v1/audit/keys/{key['key_ID']}").json()
    block = prov["bits"]["block_provenance"]
    assert block["protocol"] == "decoy-bb84" and block["is_qkd"] is True and block["simulated"] is True
    assert block["distance_km"] == 25.0
    assert 0.02 < block["qber"] < 0.05  # GYS misalignment 3.3 % plus dark counts
    assert block["leaked_bits"] > 0 and 0 < block["pa_ratio"] < 1
    assert block["epsilon_sec"] > 0 and block["epsilon_cor"] > 0
    pa = block["details"]["privacy_amplification"]  # the family is part of the stored provenance
    assert pa["family"] == "multiply-add-shift" and pa["output_bits"] > 0
    assert pa["seed_bits"] == 2 * (pa["input_bits"] + pa["output_bits"] - 1)


def test_attacked_link_is_suspended_and_the_pair_falls_back_to_ml_kem(tmp_path: Path) -> None:
    policy = {"mode": "qkd", "pqc_fallback": True, "kem": "ML-KEM-768"}
    with running_kme(
        tmp_path / "kme",
        None,
        saes=(M, S),
        auditors=(AUD,),
        link_source="simulated",
        policy=policy,
        link_options={"pacing": "fast", "attack": "intercept-resend:1.0", "seed": 5},
        fill_keys=0,
    ) as kme:
        cert, pem_key = auditor_credential_paths(kme.workdir, AUD)
        with kme.process.client(kme.ca, cert, pem_key) as auditor:
            deadline = time.monotonic() + 60
            records: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                records = auditor.get("/api/v1/audit/events", params={"limit": 1000}).json()["records"]
                if any(r["action"] == "link.suspended" for r in records):
                    break
                time.sleep(0.5)
            alarm = next(r for r in records if r["action"] == "link.alarm")
            assert alarm["data"]["code"] == "qber-over-threshold"  # type: ignore[index]
            assert any(r["action"] == "link.suspended" for r in records)
            status = kme.client(M).get(f"/api/v1/keys/{S}/status").json()
            assert status["stored_key_count"] == 0
            got = kme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0]
            prov = auditor.get(f"/api/v1/audit/keys/{got['key_ID']}").json()
        assert (
            prov["policy"] == "pqc_fallback"
            and prov["bits"] is None
            and prov["kem"]["algorithm"] == "ML-KEM-768"
        )
        fetched = (
            kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": got["key_ID"]}).json()["keys"]
        )
        assert fetched == [got]
