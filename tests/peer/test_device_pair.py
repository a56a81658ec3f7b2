"""Issue 5, items 2 and 3, end to end: one simulated QKD device pair process and two KME processes.

``qkms sim device serve`` stands in for two vendor devices joined by a full-physics simulated fibre.
KME A is an SAE of device A and the *master* of the ETSI 014 link: its pool filler pulls keys with
Get key (enc_keys) and announces each block, with its key_IDs as ``sync`` metadata, to KME B over
the KME-to-KME protocol. KME B is an SAE of device B and the *follower*: on the announcement it
fetches the same keys by key_ID (dec_keys) from its own device, stores its copy and confirms, and
only then do A's blocks become active. An SAE at A then gets keys (enc_keys) whose copies an SAE at
B gets from B (dec_keys), through real processes, mTLS and the peer protocol.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kms.lab.pilot import SiteSpec, prepare_network, running_network
from kms.provision.peers import add_link, add_peer
from tests.adapters.device_harness import SimDevice, sim_device
from tests.peer.conftest import POOL, Network

LINK = "link-ab-dev"
KEY_SIZE = 256
# Small blocks (16 keys of 256 bits, one storage piece each) pulled every 0.2 s: the first blocks
# are confirmed within a few seconds of the device's first privacy-amplified block.
MASTER_PULL = {"keys_per_pull": 16, "key_size": KEY_SIZE, "poll_interval_s": 0.2, "max_backoff_s": 1.0}
# A's pool is bounded so that, once the device is gone, a few requests drain it.
DEVICE_POOL = {**POOL, "max_pool_bits": 16 * 1024}


@dataclass
class DeviceNetwork:
    net: Network
    device: SimDevice
    logs: list[Path]

    def db(self, site: str) -> closing[sqlite3.Connection]:
        """The site's SQLite database, read-only beside the running KME."""
        path = self.net.sites[site].workdir / "qkms.db"
        return closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def _credentials(device: SimDevice, client: str) -> dict[str, str]:
    return {name: str(Path(p).resolve()) for name, p in device.credentials(client).items()}


def _declare(root: Path, device: SimDevice) -> Network:
    """Sites A and B, their bundles exchanged and each other's URL known, and the device link declared
    at both ends by hand: the same link ID, master at A (device A), follower at B (device B)."""
    sites = prepare_network(
        root,
        [SiteSpec("KME-A", ("SAE-A1", "SAE-A2")), SiteSpec("KME-B", ("SAE-B1", "SAE-B2"))],
        [],  # no pilot link: its options are the same at both ends, and these two ends differ
        pool=DEVICE_POOL,
    )
    a, b = sites["KME-A"], sites["KME-B"]
    # Without a pilot link the sites are not adjacent: give each the other's URL.
    add_peer(a.config_path, root / "KME-B.bundle.json", b.url)
    add_peer(b.config_path, root / "KME-A.bundle.json", a.url)
    common = {"protocol": "decoy-bb84", "timeout_s": 5.0}
    add_link(
        a.config_path,
        LINK,
        "KME-B",
        "etsi014",
        {
            **common,
            "role": "master",
            "url": device.url("A"),
            "peer_sae_id": "kme-b",  # KME B's SAE ID at device B: the slave of every Get key
            **_credentials(device, "kme-a"),
            **MASTER_PULL,
        },
    )
    add_link(
        b.config_path,
        LINK,
        "KME-A",
        "etsi014",
        {
            **common,
            "role": "follower",
            "url": device.url("B"),
            "peer_sae_id": "kme-a",  # KME A's SAE ID at device A: the master of the announced keys
            **_credentials(device, "kme-b"),
        },
    )
    return Network(sites, {})


def stored_count(net: Network, site: str, master: str, slave: str) -> int:
    r = net.sae(site, master).get(f"/api/v1/keys/{slave}/status")
    assert r.status_code == 200, r.text
    count: int = r.json()["stored_key_count"]
    return count


def wait_for_confirmed_keys(env: DeviceNetwork, timeout: float = 40.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if env.device.proc.poll() is not None:
            raise AssertionError(f"device process exited:\n{env.device.log_tail()}")
        count = stored_count(env.net, "KME-A", "SAE-A1", "SAE-B1")
        if count > 0:
            return count
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in env.logs)
    raise AssertionError(f"KME-A never had a confirmed key for SAE-B1\n{env.device.log_tail()}\n{logs}")


@pytest.fixture(scope="module")
def device_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceNetwork]:
    root = tmp_path_factory.mktemp("device-pair")
    with sim_device(root, min_keys=0) as device:
        net = _declare(root, device)
        with running_network(net.sites):
            logs = [s.process.log_path for s in net.sites.values() if s.process and s.process.log_path]
            env = DeviceNetwork(net, device, [device.log_path, *logs])
            try:
                wait_for_confirmed_keys(env)
                yield env
            finally:
                net.close()


def enc(net: Network, number: int = 2) -> list[dict[str, str]]:
    r = net.sae("KME-A", "SAE-A1").post(
        "/api/v1/keys/SAE-B1/enc_keys", json={"number": number, "size": KEY_SIZE}
    )
    assert r.status_code == 200, r.text
    keys: list[dict[str, str]] = r.json()["keys"]
    return keys


def dec(net: Network, key_ids: list[str]) -> list[dict[str, str]]:
    r = net.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in key_ids]}
    )
    assert r.status_code == 200, r.text
    keys: list[dict[str, str]] = r.json()["keys"]
    return keys


def _provenance(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    rows = conn.execute("SELECT state, provenance FROM key_blocks WHERE link_id = ?", (LINK,)).fetchall()
    return [(state, json.loads(p)) for state, p in rows]


def test_enc_at_a_dec_at_b_through_the_device_pair(device_network: DeviceNetwork) -> None:
    net = device_network.net
    keys = enc(net, 4)
    assert all(len(base64.b64decode(k["key"])) * 8 == KEY_SIZE for k in keys)
    got = dec(net, [k["key_ID"] for k in keys])
    assert [k["key_ID"] for k in got] == [k["key_ID"] for k in keys]
    assert [k["key"] for k in got] == [k["key"] for k in keys]
    assert len({k["key"] for k in keys}) == 4

    # Provenance at B: every block of the link came from B's own device through the follower adapter,
    # and the device said it is simulated.
    with device_network.db("KME-B") as conn:
        blocks = _provenance(conn)
    assert blocks
    for _state, prov in blocks:
        assert prov["adapter"] == "etsi014-upstream"
        assert prov["simulated"] is True
        assert prov["is_qkd"] is True
        assert prov["details"]["role"] == "follower"
        assert prov["details"]["device_url"] == device_network.device.url("B")
        assert set(prov["sync"]) == {"key_IDs", "key_size"}
    # ... and at A, from device A through the master adapter, with the device's own status extension.
    with device_network.db("KME-A") as conn:
        a_blocks = _provenance(conn)
    assert a_blocks and all(
        p["adapter"] == "etsi014-upstream" and p["simulated"] is True for _, p in a_blocks
    )
    assert all(p["details"]["role"] == "master" for _, p in a_blocks)
    assert any(p["details"]["device_status_extension"]["preset"] == "gys" for _, p in a_blocks)

    # No key material in any log: not the delivered keys, nor their hex.
    texts = [p.read_text(errors="replace") for p in device_network.logs]
    for k in keys:
        raw = base64.b64decode(k["key"])
        for text in texts:
            assert k["key"] not in text and raw.hex() not in text and raw.hex().upper() not in text


def test_keys_are_served_once_at_b(device_network: DeviceNetwork) -> None:
    net = device_network.net
    keys = enc(net)
    ids = [k["key_ID"] for k in keys]
    dec(net, ids)
    # A retry inside the redelivery window (a lost answer) gets the same keys; another SAE gets 401.
    again = net.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert again.status_code == 200
    assert [k["key"] for k in again.json()["keys"]] == [k["key"] for k in keys]
    other = net.sae("KME-B", "SAE-B2").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert other.status_code == 401


def test_device_stopped_a_serves_what_was_confirmed_then_503(device_network: DeviceNetwork) -> None:
    """Stops the device process: runs last in this module.

    What the code does, and why it is right: blocks that B confirmed are held at both KMEs (B fetched
    its copy from device B before confirming), so A keeps serving them with the device gone and B
    still delivers the same keys; nothing needs the device once a block is active. Blocks A pulled
    but B never confirmed stay ``pre_active`` at A — B cannot fetch them from a dead device — and are
    never served. Once A's confirmed pieces are used up, enc_keys answers 503 (retry later).
    """
    net = device_network.net
    proc = device_network.device.proc
    # The device crashes (SIGKILL). A SIGTERM would do as well but takes ~30 s: its uvicorn servers wait
    # for the KMEs' idle keep-alive TLS connections to finish their close handshake.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # A block B fetched just before the crash may still be confirmed by the next announcement.
    time.sleep(1.5)
    # Whatever is active now at A was confirmed by B: still served, identically at B.
    keys = enc(net)
    assert [k["key"] for k in dec(net, [k["key_ID"] for k in keys])] == [k["key"] for k in keys]

    def drain() -> int | None:
        status = None
        for _ in range(200):
            left = stored_count(net, "KME-A", "SAE-A1", "SAE-B1")
            number = max(1, min(left, 128))
            r = net.sae("KME-A", "SAE-A1").post(
                "/api/v1/keys/SAE-B1/enc_keys", json={"number": number, "size": KEY_SIZE}
            )
            status = r.status_code
            if status != 200:
                return status
            got = r.json()["keys"]
            assert [k["key"] for k in dec(net, [k["key_ID"] for k in got])] == [k["key"] for k in got]
        return status

    # A drains its confirmed pieces; B then grants A its untouched confirmed pieces (rebalancing), which
    # A serves too; once both ends' confirmed stock is gone, A answers 503 and stays there: nothing
    # refills without the device, and the pre_active blocks never become servable.
    for _ in range(10):
        assert drain() == 503
        time.sleep(1.5)  # a rebalance may hand A more of B's untouched pieces
        r = net.sae("KME-A", "SAE-A1").post(
            "/api/v1/keys/SAE-B1/enc_keys", json={"number": 1, "size": KEY_SIZE}
        )
        if r.status_code == 503 and stored_count(net, "KME-A", "SAE-A1", "SAE-B1") == 0:
            break
        if r.status_code == 200:
            got = r.json()["keys"]
            assert [k["key"] for k in dec(net, [k["key_ID"] for k in got])] == [k["key"] for k in got]
    else:
        raise AssertionError("A never ran dry after the device stopped")
    assert "message" in r.json()
    # What A still holds unconfirmed, B never got from its device: it stays pre_active, unserved.
    with device_network.db("KME-A") as conn:
        unconfirmed = {
            row[0]
            for row in conn.execute(
                "SELECT source_block_id FROM key_blocks WHERE link_id = ? AND state = 'pre_active'", (LINK,)
            )
        }
    with device_network.db("KME-B") as conn:
        at_b = {
            row[0]
            for row in conn.execute("SELECT source_block_id FROM key_blocks WHERE link_id = ?", (LINK,))
        }
    assert not unconfirmed & at_b
