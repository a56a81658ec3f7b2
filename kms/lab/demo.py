"""The main job: a KME on the embedded default and a master/slave SAE exchange through the real API.

It creates a working directory with ``qkms init``, starts ``qkms serve`` as a child process (mTLS on
127.0.0.1), waits for the link to fill the pool, and then plays the roles of three SAEs. It prints
key IDs and outcomes, never key material.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths
from kms.runtime.assembly import build_runtime
from kms.service.audit_queries import AuditService
from kms.storage.status_queries import pool_report

MARKER = ".qkms-demo"
MASTER, SLAVE, EXTRA = "SAE-ALICE", "SAE-BOB", "SAE-CAROL"
_Key = dict[str, Any]  # one key of an ETSI GS QKD 014 Key container, as JSON


def _fresh(directory: Path) -> None:
    if directory.exists():
        if not (directory / MARKER).exists():
            raise SystemExit(f"{directory} exists and is not a QKMS demo directory; choose another --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("created by qkms demo\n")


def run_demo(directory: Path, link_source: str, console: Console) -> int:
    _fresh(directory)
    work = directory / "kme"
    console.rule("[bold]1. qkms init")
    result = init_workdir(work, "KME-DEMO", [MASTER, SLAVE, EXTRA], port=free_port(), link_source=link_source)
    console.print(f"working directory {work}: CA, KME certificate, 3 SAE certificates, KEK, SQLite database")
    settings = KmsSettings.load(result.config_path)
    kme = KmeProcess(result.config_path, settings.kme.port)
    console.rule("[bold]2. qkms serve (mTLS on 127.0.0.1)")
    kme.start()
    console.print(f"KME listening on {kme.base_url}; server log: {kme.log_path}")
    try:
        return _exchange(kme, work, result.ca_cert, console)
    finally:
        kme.stop()
        console.print("KME stopped.")


def _client(kme: KmeProcess, work: Path, ca: Path, sae_id: str) -> httpx.Client:
    cert, key = sae_credential_paths(work, sae_id)
    return kme.client(ca, cert, key)


def _exchange(kme: KmeProcess, work: Path, ca: Path, console: Console) -> int:
    alice, bob, carol = (_client(kme, work, ca, s) for s in (MASTER, SLAVE, EXTRA))
    with alice, bob, carol:
        console.rule("[bold]3. waiting for the link to fill the key pool")
        _show_status(kme, alice, console)
        console.rule("[bold]4. master SAE asks for keys (enc_keys)")
        got, multi = _master_requests_keys(alice, console)
        console.rule("[bold]5. slave SAEs fetch the same keys (dec_keys)")
        ok = _slaves_fetch_same_keys(bob, carol, got, multi, console)
        master_ids = [k["key_ID"] for k in got + multi]
        console.rule("[bold]6. the rules hold")
        ok &= _rules_hold(alice, bob, carol, got, console)

    console.rule("[bold]7. where a key came from (provenance, as an auditor sees it)")
    settings = KmsSettings.load(kme.config_path)
    _show_provenance(settings, master_ids[0], console)

    console.rule("[bold]8. qkms status")
    _show_pool(settings, console)
    console.print("[bold green]demo succeeded[/bold green]" if ok else "[bold red]demo FAILED[/bold red]")
    return 0 if ok else 1


def _show_status(kme: KmeProcess, alice: httpx.Client, console: Console) -> None:
    """Step 3: wait until the pool holds keys, then print the master's Get status answer."""
    stored = kme.wait_for_keys(alice, SLAVE, minimum=16, timeout=120)
    status = alice.get(f"/api/v1/keys/{SLAVE}/status").json()
    table = Table(title=f"Get status ({MASTER} -> {SLAVE})")
    table.add_column("field")
    table.add_column("value")
    for name, value in status.items():
        table.add_row(name, str(value))
    console.print(table)
    console.print(f"pool holds {stored} keys of {status['key_size']} bits")


def _master_requests_keys(alice: httpx.Client, console: Console) -> tuple[list[_Key], list[_Key]]:
    """Step 4: two 256-bit keys for the slave, two 512-bit keys for the slave and the extra SAE."""
    got = alice.get(f"/api/v1/keys/{SLAVE}/enc_keys", params={"number": 2, "size": 256}).json()["keys"]
    multi = alice.post(
        f"/api/v1/keys/{SLAVE}/enc_keys",
        json={"number": 2, "size": 512, "additional_slave_SAE_IDs": [EXTRA]},
    ).json()["keys"]
    for k in got:
        console.print(f"{MASTER} got key {k['key_ID']} (256 bits) for {SLAVE}")
    for k in multi:
        console.print(f"{MASTER} got key {k['key_ID']} (512 bits) for {SLAVE} and {EXTRA}")
    return got, multi


def _slaves_fetch_same_keys(
    bob: httpx.Client, carol: httpx.Client, got: list[_Key], multi: list[_Key], console: Console
) -> bool:
    """Step 5: the slaves fetch the master's keys by ID; True when every one is identical."""
    first = bob.get(f"/api/v1/keys/{MASTER}/dec_keys", params={"key_ID": got[0]["key_ID"]}).json()["keys"]
    rest = bob.post(
        f"/api/v1/keys/{MASTER}/dec_keys",
        json={"key_IDs": [{"key_ID": k["key_ID"]} for k in got[1:] + multi]},
    ).json()["keys"]
    carol_keys = carol.post(
        f"/api/v1/keys/{MASTER}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in multi]}
    ).json()["keys"]
    master_view = {k["key_ID"]: k["key"] for k in got + multi}
    ok = True
    for holder, keys in ((SLAVE, first + rest), (EXTRA, carol_keys)):
        for k in keys:
            same = master_view.get(k["key_ID"]) == k["key"]
            ok &= same
            console.print(
                f"{holder} fetched {k['key_ID']}: identical to the master's key: {'yes' if same else 'NO'}"
            )
    return ok


def _rules_hold(
    alice: httpx.Client, bob: httpx.Client, carol: httpx.Client, got: list[_Key], console: Console
) -> bool:
    """Step 6: redelivery gives the same key, another SAE's key is refused, a bad size is refused."""
    # A slave whose answer was lost may fetch a consumed key again inside the redelivery window
    # (pool.redelivery_seconds; audited as keys.redelivered): the same key, never another.
    again = bob.get(f"/api/v1/keys/{MASTER}/dec_keys", params={"key_ID": got[0]["key_ID"]})
    same_again = again.status_code == 200 and again.json()["keys"][0]["key"] == got[0]["key"]
    console.print(
        f"{SLAVE} asks again for a consumed key (a lost answer) -> {again.status_code},"
        f" the same key again inside the redelivery window: {'yes' if same_again else 'NO'}"
    )
    other = alice.get(f"/api/v1/keys/{SLAVE}/enc_keys").json()["keys"][0]["key_ID"]
    stolen = carol.get(f"/api/v1/keys/{MASTER}/dec_keys", params={"key_ID": other})
    console.print(
        f"{EXTRA} asks for a key made for {SLAVE} -> {stolen.status_code} {stolen.json()['message']!r}"
    )
    bad = alice.get(f"/api/v1/keys/{SLAVE}/enc_keys", params={"size": 100})
    console.print(f"{MASTER} asks for size=100 -> {bad.status_code} {bad.json()['message']!r}")
    return same_again and stolen.status_code == 401 and bad.status_code == 400


def _show_provenance(settings: KmsSettings, key_id: str, console: Console) -> None:
    """Step 7: where the first key's bits came from, read as an auditor reads them."""
    runtime = build_runtime(settings, sync_registry=False)
    try:
        prov = AuditService(runtime.db, runtime.identity, settings.kme.id).provenance(key_id)
    finally:
        runtime.close()
    if prov is None or prov["bits"] is None:
        return
    block = prov["bits"]["block_provenance"]
    console.print(
        f"key {prov['key_ID']}: {prov['state']}, bits {prov['bits']['first_bit']}.."
        f"{prov['bits']['first_bit'] + prov['size_bits'] - 1} of block {prov['bits']['source_block_ID']}"
    )
    console.print(
        f"  link {prov['bits']['link_ID']}: {block['protocol']} (simulated: {block['simulated']}, "
        f"QKD: {block['is_qkd']}), {block['distance_km']} km, QBER {block['qber']}, "
        f"leaked {block['leaked_bits']} bits, PA ratio {block['pa_ratio']}, "
        f"eps_sec {block['epsilon_sec']}, eps_cor {block['epsilon_cor']}"
    )
    console.print(f"  transitions: {[(t['from'], t['to'], t['actor']) for t in prov['transitions']]}")


def _show_pool(settings: KmsSettings, console: Console) -> None:
    """Step 8: what ``qkms status`` reports per link, and the keys by state."""
    report = pool_report(settings.database.url)
    for link in report.links:
        console.print(
            f"link {link.link_id} ({link.adapter}): {link.active_blocks} active blocks, {link.stored_bits} bits"
        )
    console.print(f"keys by state: {report.keys_by_state}")
