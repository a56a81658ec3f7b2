"""Builds each configured link's key source (the adapters live in ``qkd_adapters``).

Sources by ``source`` kind: ``random`` (CSPRNG test source), ``simulated`` (in-process simulated
link), ``key-files`` (a directory of key files, ``qkd_adapters.key_files``) and ``etsi014`` (a vendor
device's ETSI GS QKD 014 API, ``qkd_adapters.etsi014_upstream``). Relative paths in a link's options
are resolved against ``base_dir`` (the config file's directory), as every other path in the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kms.config import ConfigError, LinkSection
from qkd_adapters.keyblock import FollowerKeySource, KeySource
from qkd_adapters.random_source import RandomTestSource

# Options of each kind that name files or directories.
PATH_OPTIONS = {
    "key-files": ("directory",),
    "etsi014": ("ca_cert", "client_cert", "client_key"),
}


def build_source(link: LinkSection, base_dir: Path | None = None, start_after: int = 0) -> KeySource:
    """The link's key source. For ``etsi014`` with ``role = "follower"`` this is an
    ``Etsi014Follower``: a ``FollowerKeySource`` whose ``pull`` yields nothing (its blocks arrive by
    announcement from the peer KME), so the pool filler can hold it harmlessly. ``start_after``: the
    highest block number a paired ``random`` source stored here before (it resumes after it)."""
    options = resolve_paths(link, base_dir)
    if link.source == "random":
        return RandomTestSource(
            link.id,
            block_bits=int(options.get("block_bits", 65536)),
            rate_bps=options.get("rate_bps"),
            shared_seed=options.get("shared_seed"),
            start_after=start_after,
        )
    if link.source == "key-files":
        from qkd_adapters.key_files import KeyFileSource

        try:
            return KeyFileSource(link.id, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"link {link.id}: invalid key-files options: {exc}") from exc
    if link.source == "etsi014":
        from qkd_adapters.etsi014_upstream import upstream_source

        try:
            return upstream_source(link.id, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"link {link.id}: invalid etsi014 options: {exc}") from exc
    from kms.crypto.channel_auth import device_authenticator
    from qkd_adapters.sim.link import SimulatedLink

    try:
        # The devices' classical channel is authenticated with ML-DSA (docs/DECISIONS.md D-5).
        authenticator = device_authenticator(str(options.pop("channel_auth", "ml-dsa-session")), link.id)
        source: KeySource = SimulatedLink(link_id=link.id, authenticator=authenticator, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"link {link.id}: invalid simulated-link options: {exc}") from exc
    return source


def is_follower(link: LinkSection) -> bool:
    """Whether the link's source gets its blocks from announcements (``fetch_announced``), not ``pull``."""
    return link.source == "etsi014" and link.options.get("role", "master") == "follower"


def build_follower(link: LinkSection, base_dir: Path | None = None) -> FollowerKeySource:
    """The link's follower source; ``ConfigError`` if the link is not configured as one."""
    if not is_follower(link):
        raise ConfigError(f"link {link.id}: not a follower link (source 'etsi014' with role 'follower')")
    source = build_source(link, base_dir)
    assert isinstance(source, FollowerKeySource)
    return source


def resolve_paths(link: LinkSection, base_dir: Path | None) -> dict[str, Any]:
    """A copy of the link's options with its relative file paths made absolute under ``base_dir``."""
    options: dict[str, Any] = dict(link.options)
    if base_dir is None:
        return options
    for name in PATH_OPTIONS.get(link.source, ()):
        value = options.get(name)
        if isinstance(value, str | Path) and not Path(value).is_absolute():
            options[name] = str((base_dir / value).resolve())
    return options
