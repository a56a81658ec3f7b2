"""A real KME process fed by the key-file adapter: files in, keys out with honest provenance."""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path

import tomli_w

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import auditor_credential_paths, init_workdir, sae_credential_paths
from tests.adapters.test_key_files import write_block

M, S, AUD = "SAE-M", "SAE-S", "AUD"


def test_kme_serves_keys_from_key_files(tmp_path: Path) -> None:
    workdir, keys = tmp_path / "kme", tmp_path / "device-out"
    keys.mkdir()
    init = init_workdir(workdir, "KME-F", [M, S], port=free_port(), link_source="random", auditor_ids=[AUD])
    config = tomllib.loads(init.config_path.read_text())
    config["links"] = [
        {
            "id": "link-files",
            "peer_kme_id": "KME-F",
            "source": "key-files",
            "options": {"directory": str(keys), "protocol": "decoy-bb84"},
        }
    ]
    init.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(init.config_path)
    sidecar = {"is_qkd": True, "qber": 0.018, "distance_km": 12.0, "epsilon_sec": 1e-10}
    for n in range(2):
        write_block(keys, f"blk-{n:04d}", os.urandom(8192), sidecar)
    proc = KmeProcess(init.config_path, settings.kme.port).start()
    try:
        cert, key = sae_credential_paths(workdir, M)
        with proc.client(init.ca_cert, cert, key) as master:
            proc.wait_for_keys(master, S, minimum=2 * 8192 * 8 // 256)
            deadline = time.monotonic() + 10
            while any(keys.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert list(keys.iterdir()) == []  # consumed files are zeroised and gone
            [served] = master.get(f"/api/v1/keys/{S}/enc_keys").json()["keys"]
        acert, akey = auditor_credential_paths(workdir, AUD)
        with proc.client(init.ca_cert, acert, akey) as auditor:
            prov = auditor.get(f"/api/v1/audit/keys/{served['key_ID']}").json()
    finally:
        proc.stop()
    block = prov["bits"]["block_provenance"]
    assert block["adapter"] == "key-files" and block["protocol"] == "decoy-bb84"
    assert block["is_qkd"] is True and block["simulated"] is False
    assert block["qber"] == 0.018 and block["distance_km"] == 12.0
    assert block["details"]["is_qkd_declared_by"] == "sidecar"
