"""Builds each configured link's key source (the adapters live in ``qkd_adapters``)."""

from __future__ import annotations

from typing import Any

from kms.config import ConfigError, LinkSection
from qkd_adapters.keyblock import KeySource
from qkd_adapters.random_source import RandomTestSource


def build_source(link: LinkSection) -> KeySource:
    options: dict[str, Any] = dict(link.options)
    if link.source == "random":
        return RandomTestSource(
            link.id, block_bits=int(options.get("block_bits", 65536)), rate_bps=options.get("rate_bps")
        )
    from kms.crypto.channel_auth import device_authenticator
    from qkd_adapters.sim.link import SimulatedLink

    try:
        # The devices' classical channel is authenticated with ML-DSA (DESIGN.md #5).
        authenticator = device_authenticator(str(options.pop("channel_auth", "ml-dsa-session")), link.id)
        source: KeySource = SimulatedLink(link_id=link.id, authenticator=authenticator, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"link {link.id}: invalid simulated-link options: {exc}") from exc
    return source
