"""Building the new link sources from KME config: key-files and etsi014 (master and follower)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.cli.device import init_device_dir
from kms.config import ConfigError, LinkSection
from kms.runtime.sources import build_follower, build_source, is_follower
from qkd_adapters.etsi014_upstream import Etsi014Follower, Etsi014Master
from qkd_adapters.key_files import KeyFileSource
from qkd_adapters.keyblock import FollowerKeySource, KeySource


def test_key_files_directory_is_relative_to_the_config(tmp_path: Path) -> None:
    link = LinkSection(id="lk", source="key-files", options={"directory": "keys", "is_qkd": True})
    source = build_source(link, base_dir=tmp_path)
    assert isinstance(source, KeyFileSource) and isinstance(source, KeySource)
    assert source.directory == tmp_path / "keys"
    assert source.describe()["is_qkd"] is True
    with pytest.raises(ConfigError, match="invalid key-files options"):
        build_source(LinkSection(id="lk", source="key-files", options={"directory": "k", "colour": 1}))
    with pytest.raises(ConfigError, match="invalid key-files options"):
        build_source(LinkSection(id="lk", source="key-files", options={}))


def test_etsi014_roles_and_relative_tls_paths(tmp_path: Path) -> None:
    init_device_dir(tmp_path / "device", "kme-a", "kme-b")
    tls = {
        "url": "https://127.0.0.1:9",
        "ca_cert": "device/ca.pem",
        "client_cert": "device/clients/kme-a.pem",
        "client_key": "device/clients/kme-a.key",
    }
    master_link = LinkSection(
        id="lk",
        source="etsi014",
        options={**tls, "role": "master", "peer_sae_id": "kme-b", "keys_per_pull": 4},
    )
    master = build_source(master_link, base_dir=tmp_path)
    assert isinstance(master, Etsi014Master) and master.keys_per_pull == 4 and not is_follower(master_link)
    master.close()
    follower_link = LinkSection(
        id="lk", source="etsi014", options={**tls, "role": "follower", "peer_sae_id": "kme-a"}
    )
    follower = build_source(follower_link, base_dir=tmp_path)
    assert isinstance(follower, Etsi014Follower) and isinstance(follower, FollowerKeySource)
    assert follower.pull() == [] and follower.describe()["role"] == "follower"
    follower.close()
    assert isinstance(build_follower(follower_link, base_dir=tmp_path), Etsi014Follower)
    with pytest.raises(ConfigError, match="not a follower link"):
        build_follower(master_link, base_dir=tmp_path)
    # Without base_dir the relative paths do not resolve from here: a clear config error.
    with pytest.raises(ConfigError, match="TLS credentials"):
        build_source(master_link)
    for bad in ({"role": "observer"}, {"url": "http://127.0.0.1:9"}, {"keys_per_pull": 0}, {"key_size": 12}):
        with pytest.raises(ConfigError, match="invalid etsi014 options"):
            build_source(
                LinkSection(id="lk", source="etsi014", options={**master_link.options, **bad}), tmp_path
            )
