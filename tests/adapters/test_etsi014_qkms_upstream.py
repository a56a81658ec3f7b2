"""The ETSI 014 upstream adapter against another QKMS instance standing in for a vendor's device.

Any ETSI GS QKD 014 KME can feed a QKMS upstream: here one QKMS (random test source) plays the
vendor device, and its two registered SAEs are the upstream identities of the two KMEs of a link.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kms.provision.workdir import sae_credential_paths
from qkd_adapters.etsi014_upstream import Etsi014Follower, Etsi014Master, block_id_for
from qkd_adapters.keyblock import KeyBlock, KeySourceError
from tests.kme_harness import RunningKme, running_kme

SITE_A, SITE_B, OTHER = "kme-a", "kme-b", "kme-c"


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    with running_kme(
        tmp_path_factory.mktemp("vendor-kme"), None, saes=(SITE_A, SITE_B, OTHER), fill_keys=64
    ) as kme:
        yield kme


def tls(kme: RunningKme, sae_id: str) -> dict[str, Any]:
    cert, key = sae_credential_paths(kme.workdir, sae_id)
    return {"ca_cert": kme.ca, "client_cert": cert, "client_key": key}


def test_master_and_follower_through_a_qkms_device(vendor: RunningKme) -> None:
    url = vendor.process.base_url
    # A classical test source behind it: the operator declares is_qkd false, and provenance says so.
    m = Etsi014Master(
        "link-ab",
        url,
        SITE_B,
        **tls(vendor, SITE_A),
        keys_per_pull=16,
        key_size=512,
        poll_interval_s=0,
        is_qkd=False,
    )
    f = Etsi014Follower("link-ab", url, SITE_A, **tls(vendor, SITE_B), is_qkd=False)
    try:
        [block] = m.pull()
        assert isinstance(block, KeyBlock)
        ids = list(block.sync["key_IDs"])
        assert len(ids) == 16 and block.sync["key_size"] == 512 and block.bit_length == 16 * 512
        assert block.block_id == block_id_for(ids)
        assert block.provenance.is_qkd is False and block.provenance.details["source_KME_ID"] == "KME-T"
        copy = f.fetch_announced(block.block_id, block.bit_length, block.sync)
        assert isinstance(copy, KeyBlock) and copy.material == block.material
        # A retry inside the vendor KME's redelivery window gets the same keys, never others.
        again = f.fetch_announced(block.block_id, block.bit_length, block.sync)
        assert isinstance(again, KeyBlock) and again.material == block.material
    finally:
        m.close()
        f.close()


def test_only_the_named_slave_gets_the_keys(vendor: RunningKme) -> None:
    url = vendor.process.base_url
    m = Etsi014Master("link-ab", url, SITE_B, **tls(vendor, SITE_A), keys_per_pull=4, poll_interval_s=0)
    # Another SAE of the same vendor KME asking for the slave's copy: the vendor KME answers 401.
    thief = Etsi014Follower("link-ab", url, SITE_A, **tls(vendor, OTHER))
    f = Etsi014Follower("link-ab", url, SITE_A, **tls(vendor, SITE_B))
    try:
        [block] = m.pull()
        assert isinstance(block, KeyBlock)
        with pytest.raises(KeySourceError, match="401"):
            thief.fetch_announced(block.block_id, block.bit_length, block.sync)
        copy = f.fetch_announced(block.block_id, block.bit_length, block.sync)
        assert isinstance(copy, KeyBlock) and copy.material == block.material
    finally:
        for source in (m, thief, f):
            source.close()


def test_a_key_size_the_device_does_not_serve_is_refused_with_an_alarm(
    vendor: RunningKme, tmp_path: Path
) -> None:
    m = Etsi014Master(
        "link-ab", vendor.process.base_url, SITE_B, **tls(vendor, SITE_A), key_size=1 << 20, poll_interval_s=0
    )
    try:
        [alarm] = m.pull()
        assert not isinstance(alarm, KeyBlock) and alarm.details["code"] == "etsi014-device-refused"
    finally:
        m.close()
