"""KME configuration: a TOML file, overridable by ``QKMS_*`` environment variables.

Relative paths in the file are resolved against the file's directory, so a working directory made by
``qkms init`` can be moved as a whole. Environment variables win over the file (``QKMS_DATABASE__URL``
points a container at its PostgreSQL without editing the file).

Why one module: the sections are one schema, validated and path-resolved together by one loader;
split, each file would only hold a few field lists that must still be read as a whole.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class KmeSection(BaseModel):
    id: str = Field(min_length=1, max_length=64)
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    # Largest request body accepted; bigger ones are refused (400) before they are read whole. A
    # Key IDs body naming 128 keys is about 8 KiB.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)


class ServerSection(BaseModel):
    """Limits of the HTTP server in front of the API: what one connection may make the KME hold,
    and for how long. A request over a limit is answered 400 (ETSI Error body) and its connection
    closed. The defaults leave ample room for ETSI GS QKD 014 requests: a GET of dec_keys naming 128
    key_IDs has a URL of about 6 KiB; ordinary clients send under 1 KiB of headers."""

    # Request line plus every header line, counted as they arrive (an endless header line too).
    max_head_bytes: int = Field(default=32 * 1024, ge=4096)
    max_url_bytes: int = Field(default=16 * 1024, ge=1024)
    max_header_line_bytes: int = Field(default=8 * 1024, ge=1024)
    max_headers: int = Field(default=64, ge=8)
    # A connection with no request in progress (fresh, or kept alive after an answer) is closed.
    idle_timeout_seconds: float = Field(default=30.0, gt=0)
    # From a request's first byte to the end of its headers; from there to the end of its body.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    # Refused authentications (401 before routing) are logged and audited as access.denied once per
    # certificate and reason per window; repeats within the window are counted into the next record.
    denial_window_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ServerSection:
        if max(self.max_url_bytes, self.max_header_line_bytes) > self.max_head_bytes:
            raise ValueError("server.max_url_bytes and max_header_line_bytes cannot exceed max_head_bytes")
        return self


class TlsSection(BaseModel):
    ca_cert: Path
    server_cert: Path
    server_key: Path


class DatabaseSection(BaseModel):
    url: str = "sqlite:///qkms.db"
    pool_size: int = Field(default=10, ge=1)
    # PostgreSQL: requests outside group commit (status, audit reads) use at most this many threads.
    max_concurrency: int = Field(default=4, ge=1)
    # PostgreSQL: group commit of Get key / Get key with key IDs — batches at once per process and
    # requests per batch (SQLite runs each request inline).
    batches_in_flight: int = Field(default=2, ge=1)
    max_batch: int = Field(default=64, ge=1)
    # SQLite: a commit that leaves the WAL larger than this truncates it (TRUNCATE checkpoint).
    wal_limit_mib: int = Field(default=64, ge=1)
    # PostgreSQL: refuse to start on a server that can forget acknowledged commits (fsync,
    # synchronous_commit or full_page_writes off; kms.storage.durability). Only for throwaway test
    # clusters may this be false.
    require_durable_commits: bool = True


class Pkcs11KekSection(BaseModel):
    """A KEK wrapped by a non-extractable AES key in a PKCS#11 token (HSM); the PIN comes from ``pin_env``."""

    module: Path
    token_label: str
    key_label: str = "qkms-kek-wrap"
    wrapped_kek_file: Path
    pin_env: str = "QKMS_PKCS11_PIN"


class KekSection(BaseModel):
    """Where the key-encryption key comes from: a file (32 raw bytes, mode 0600), an env variable
    (base64), or a PKCS#11 token that unwraps it at start."""

    file: Path | None = None
    env_var: str | None = None
    pkcs11: Pkcs11KekSection | None = None
    # The first version's name. After ``qkms kek rotate`` the database's keyring (kek_versions) says
    # which versions exist and where each is loaded from; this section is then only the first one.
    key_id: str = "kek-1"
    # How often each process re-reads the keyring (and at once when a record names a version it
    # lacks): a rotation's new version seals everywhere within this time (docs/DECISIONS.md D-27).
    refresh_seconds: float = Field(default=2.0, gt=0, le=60)

    @model_validator(mode="after")
    def _one_source(self) -> KekSection:
        if sum(x is not None for x in (self.file, self.env_var, self.pkcs11)) != 1:
            raise ValueError("configure exactly one of kek.file, kek.env_var or kek.pkcs11")
        return self


class PoolSection(BaseModel):
    """Key sizes in bits, as ETSI 014 reports them in Get status."""

    key_size: int = Field(default=256, gt=0)
    min_key_size: int = Field(default=64, gt=0)
    max_key_size: int = Field(default=4096, gt=0)
    max_key_per_request: int = Field(default=128, gt=0)
    max_sae_id_count: int = Field(default=4, ge=0)
    max_pool_bits: int = Field(default=64 * 1024 * 1024, gt=0)
    storage_block_bits: int = Field(default=65536, gt=0)
    reserved_ttl_seconds: float = Field(default=300.0, gt=0)
    expiry_sweep_seconds: float = Field(default=2.0, gt=0)
    # How long a consumed key's sealed material is kept so that a slave whose answer was lost may
    # fetch the same key_IDs again (audited as keys.redelivered); 0 zeroises at consumption. Bounded:
    # every second is a second longer that a delivered key exists, encrypted, at rest.
    redelivery_seconds: float = Field(default=60.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _consistent(self) -> PoolSection:
        for name in ("key_size", "min_key_size", "max_key_size", "storage_block_bits"):
            if getattr(self, name) % 8:
                raise ValueError(f"pool.{name} must be a multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("pool sizes must satisfy min_key_size <= key_size <= max_key_size")
        if self.max_key_size > self.storage_block_bits:
            raise ValueError("pool.max_key_size cannot exceed pool.storage_block_bits")
        return self


class LinkSection(BaseModel):
    """One QKD link (or test source) feeding this KME's pool for keys shared with ``peer_kme_id``."""

    id: str = Field(min_length=1, max_length=64)
    peer_kme_id: str | None = None
    source: Literal["random", "simulated", "key-files", "etsi014"] = "simulated"
    options: dict[str, Any] = Field(default_factory=dict)


class SaeSection(BaseModel):
    id: str = Field(min_length=1, max_length=128)
    cert_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    kme_id: str | None = None


class PolicyRuleSection(BaseModel):
    master: str = "*"
    slave: str = "*"
    mode: Literal["qkd", "hybrid"]
    pqc_fallback: bool = False


class PolicySection(BaseModel):
    """Default key policy and per-pair rules (first match wins; ``*`` matches any SAE)."""

    mode: Literal["qkd", "hybrid"] = "qkd"
    pqc_fallback: bool = False
    kem: Literal["ML-KEM-768", "ML-KEM-1024"] = "ML-KEM-768"
    rules: list[PolicyRuleSection] = Field(default_factory=list)


class AuditorSection(BaseModel):
    """A security-team client: may read the audit API, never key material."""

    id: str = Field(min_length=1, max_length=128)
    cert_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuditSection(BaseModel):
    """Signed checkpoints and where they are anchored (docs/SECURITY.md, "full database write access").

    A checkpoint is written once ``checkpoint_records`` records are unsigned, or ``checkpoint_seconds``
    after the last one if any record is unsigned. ``audit verify`` accepts at most
    ``max_unsigned_records`` records after the last checkpoint, spanning at most
    ``max_unsigned_seconds`` by their own timestamps; more means checkpoints were deleted. Anchors go to
    ``anchor_dir`` (relative to the config file's directory) — put it on storage the database's
    administrators cannot write."""

    checkpoint_seconds: float = Field(default=5.0, gt=0)
    checkpoint_records: int = Field(default=1000, ge=1)
    max_unsigned_records: int = Field(default=10_000, ge=1)
    max_unsigned_seconds: float = Field(default=60.0, gt=0)
    anchor_dir: Path = Path("audit-anchors")

    @model_validator(mode="after")
    def _window_covers_cadence(self) -> AuditSection:
        if self.max_unsigned_records < 2 * self.checkpoint_records:
            raise ValueError("audit.max_unsigned_records must be at least twice audit.checkpoint_records")
        if self.max_unsigned_seconds < 2 * self.checkpoint_seconds:
            raise ValueError("audit.max_unsigned_seconds must be at least twice audit.checkpoint_seconds")
        return self


class LinkHealthSection(BaseModel):
    """Which link alarms suspend a link's keys (matched against the alarm's code)."""

    suspend_on: list[str] = Field(
        default_factory=lambda: [
            "qber-over-threshold",
            "verification-failed",
            "authentication-failed",
            "reconciliation-failed",
            "no-bell-violation",
        ]
    )


class PeeringSection(BaseModel):
    """How this KME talks to other KMEs: its own client certificate (role ``kme``) and the limits of
    the KME-to-KME protocol."""

    client_cert: Path = Path("pki/kme-client.pem")
    client_key: Path = Path("pki/kme-client.key")
    timeout_seconds: float = Field(default=3.0, gt=0)
    max_clock_skew_seconds: float = Field(default=30.0, gt=0)
    sync_seconds: float = Field(default=0.5, gt=0)
    # A shared block the peer has not confirmed within this long is destroyed (it counts against the
    # link's pool limit while it waits).
    unconfirmed_block_seconds: float = Field(default=600.0, gt=0)
    # Link-state records (DECISIONS.md D-26): this KME issues its own at least this often, and routes
    # only on other KMEs' records issued within ``link_state_max_age_seconds``.
    topology_heartbeat_seconds: float = Field(default=30.0, gt=0)
    link_state_max_age_seconds: float = Field(default=100.0, gt=0)
    # Hop-by-hop messages authenticated by a MAC under a key set up with each neighbour (DECISIONS.md
    # D-35) instead of an ML-DSA signature each. Off: this KME signs everything and declines MAC keys
    # (as a KME of a version before D-35 does; its neighbours then sign to it).
    hop_macs: bool = True
    # The leader tells every KME the state of this KME's SAEs that ``qkms sae`` changed this often
    # (and once after start), for KMEs that were unreachable when a command told them (D-39).
    sae_resend_seconds: float = Field(default=300.0, gt=0)


class PeerSection(BaseModel):
    """Another KME of the network. ``bundle`` is its ``qkms peer export`` (CA certificate, client
    certificate fingerprint, ML-DSA/ML-KEM public keys, SAEs); ``url`` is set for KMEs this one shares
    a link with, and left out for KMEs reached only through trusted-node relay."""

    kme_id: str = Field(min_length=1, max_length=64)
    bundle: Path
    url: str | None = Field(default=None, pattern=r"^https://")


class LoggingSection(BaseModel):
    """How ``qkms serve`` logs (docs/OPERATIONS.md "Logs", DECISIONS.md D-37)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON lines unless stderr is a terminal; json or console force one (also --log-format).
    format: Literal["auto", "json", "console"] = "auto"
    json_logs: bool = False  # older spelling of format = "json" (a format other than auto wins)
    # One ``request`` line per API request (request ID, caller, endpoint, status, latency).
    requests: bool = True

    def effective_format(self) -> str:
        return "json" if self.format == "auto" and self.json_logs else self.format


class SaeRegistrySection(BaseModel):
    """The SAE lifecycle (``qkms sae``, docs/OPERATIONS.md "SAE lifecycle", DECISIONS.md D-29)."""

    # Each serving process compares its registry with the database's version at most this often;
    # a ``qkms sae`` change is enforced by every process once this much time has passed.
    refresh_ms: int = Field(default=100, ge=10, le=5000)
    # After ``qkms sae rotate`` the previous certificate is still accepted for this long.
    rotation_grace_hours: float = Field(default=24.0, ge=0, le=24 * 90)
    # ``qkms status`` warns this many days before a certificate expires.
    expiry_warning_days: int = Field(default=30, ge=0, le=3650)
    # Validity of SAE certificates ``qkms sae add|rotate`` issues from the site CA.
    issue_valid_days: int = Field(default=397, ge=1, le=3650)
    # Enterprise CAs trusted for pinned SAE certificates (relative to the config file's directory).
    trusted_ca_dir: Path = Path("pki/trusted")


class QuotaSection(BaseModel):
    """Fair shares of the pool (issue 16 part 4, docs/OPERATIONS.md "Fair shares", DECISIONS.md D-30):
    0 turns a limit off, and all are off by default. Rates are per master SAE and per (master, slave)
    pair, enforced by each API process for its share (``--workers N``: each process allows 1/N)."""

    sae_requests_per_second: float = Field(default=0.0, ge=0)
    sae_keys_per_second: float = Field(default=0.0, ge=0)
    sae_bits_per_second: float = Field(default=0.0, ge=0)
    pair_requests_per_second: float = Field(default=0.0, ge=0)
    pair_keys_per_second: float = Field(default=0.0, ge=0)
    pair_bits_per_second: float = Field(default=0.0, ge=0)
    # A bucket holds this many seconds of its rate: the largest burst, and the largest single request.
    burst_seconds: float = Field(default=1.0, gt=0, le=3600)
    # Keys a master may hold reserved that its slaves have not fetched yet.
    max_reserved_keys_per_master: int = Field(default=0, ge=0)
    # The share of a link's pool (``pool.max_pool_bits``) a master may hold reserved and unfetched.
    max_pool_share: float = Field(default=0.0, ge=0, le=1)
    # How often each process re-reads the reserved counts from the database.
    reserved_refresh_ms: int = Field(default=250, ge=10, le=10_000)
    # Refusals are audited once per (master, slave, rule) and window, with the count of the others.
    audit_window_seconds: float = Field(default=60.0, gt=0)


class OperatorSection(BaseModel):
    """The operator listener (docs/OPERATIONS.md, "Health and metrics"; D-11): health and Prometheus
    metrics on a port of their own, never on the ETSI port. Off unless ``enabled``; loopback and TLS
    (the KME's own certificate) by default. Health needs no credentials; ``/metrics`` needs the
    bearer token in ``metrics_token_file`` unless ``unauthenticated_metrics`` (as Vault's
    ``unauthenticated_metrics_access``). ``enabled = false`` also turns the per-request counters off."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9443, ge=1, le=65535)
    tls: bool = True
    unauthenticated_metrics: bool = False
    metrics_token_file: Path | None = None
    # A probe (health, metrics, the console before each page) waits at most this long for the
    # database; a stuck one is reported, never waited on.
    health_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    # Figures read from the database are reused for this long (several scrapers cost one query).
    db_metrics_max_age_seconds: float = Field(default=5.0, ge=0, le=300)
    # Label cardinality bound: at most this many (master, slave) SAE pairs get their own series;
    # the rest are summed under master_sae="_other", slave_sae="_other".
    max_pair_series: int = Field(default=200, ge=1, le=10_000)
    # The web console (docs/OPERATIONS.md "Operator console", D-36): served under /console only
    # with TLS on (its session cookie is Secure); accounts are made with `qkms operator add`.
    console: bool = True
    session_hours: float = Field(default=8.0, gt=0, le=24 * 7)  # a session ends this long after login
    session_idle_minutes: float = Field(default=30.0, gt=0, le=24 * 60)  # ... or this long unused
    max_failed_logins: int = Field(default=5, ge=1, le=100)  # wrong passwords in a row lock the account
    lockout_minutes: float = Field(default=15.0, gt=0, le=24 * 60)

    @model_validator(mode="after")
    def _metrics_protected(self) -> OperatorSection:
        if self.enabled and not self.unauthenticated_metrics and self.metrics_token_file is None:
            raise ValueError(
                "operator.metrics_token_file is required unless operator.unauthenticated_metrics = true"
            )
        return self


class SiemSyslogSection(BaseModel):
    """A syslog receiver for the audit stream: RFC 5424 messages, octet-counted (RFC 6587) over TCP,
    TLS by default. The receiver's certificate is checked against ``ca_file`` (default: the site CA,
    ``tls.ca_cert``) and must name ``server_name`` (default: ``host``)."""

    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=6514, ge=1, le=65535)
    transport: Literal["tcp", "tls"] = "tls"
    ca_file: Path | None = None
    server_name: str | None = None
    # A client certificate for receivers that require one (mutual TLS); both or neither.
    client_cert: Path | None = None
    client_key: Path | None = None
    # RFC 5424 facility (13: log audit) and the HOSTNAME field (default: this host's name).
    facility: int = Field(default=13, ge=0, le=23)
    hostname: str | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    # Plain syslog has no acknowledgements: a batch counts as delivered (and the shipped position
    # moves past it) once the receiver's TCP has acknowledged every byte and the connection has then
    # stayed up this long. Records in doubt are sent again after a reconnect (duplicates by seq).
    confirm_seconds: float = Field(default=1.0, ge=0, le=60)

    @model_validator(mode="after")
    def _pair(self) -> SiemSyslogSection:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("siem.syslog.client_cert and client_key go together")
        return self


class SiemSection(BaseModel):
    """Audit to SIEM (docs/OPERATIONS.md "Audit to SIEM", DECISIONS.md D-33): every audit record, as
    one JSON line, to ``file`` and/or a ``syslog`` receiver; at least once, from the database. Off
    unless one of them is set. ``state_dir`` (relative to the config file) keeps each sink's shipped
    position."""

    file: Path | None = None
    fsync: bool = True
    syslog: SiemSyslogSection | None = None
    state_dir: Path = Path("siem-state")
    batch_records: int = Field(default=500, ge=1, le=10_000)
    # Batches sent but not yet confirmed (syslog) before the shipper waits for the receiver.
    max_batches_in_flight: int = Field(default=8, ge=1, le=1000)
    poll_seconds: float = Field(default=0.2, gt=0, le=60)
    backoff_initial_seconds: float = Field(default=0.5, gt=0, le=60)
    backoff_max_seconds: float = Field(default=30.0, gt=0, le=3600)

    @property
    def active(self) -> bool:
        return self.file is not None or self.syslog is not None


class KmsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QKMS_", env_nested_delimiter="__", extra="forbid")

    kme: KmeSection
    server: ServerSection = ServerSection()
    tls: TlsSection
    database: DatabaseSection = DatabaseSection()
    kek: KekSection
    pool: PoolSection = PoolSection()
    links: list[LinkSection] = Field(default_factory=list)
    saes: list[SaeSection] = Field(default_factory=list)
    auditors: list[AuditorSection] = Field(default_factory=list)
    policy: PolicySection = PolicySection()
    audit: AuditSection = AuditSection()
    link_health: LinkHealthSection = LinkHealthSection()
    peering: PeeringSection = PeeringSection()
    peers: list[PeerSection] = Field(default_factory=list)
    logging: LoggingSection = LoggingSection()
    operator: OperatorSection = OperatorSection()
    sae_registry: SaeRegistrySection = SaeRegistrySection()
    quotas: QuotaSection = QuotaSection()
    siem: SiemSection = SiemSection()
    config_dir: Path = Path()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _resolve(self) -> KmsSettings:
        base = self.config_dir
        self.tls = TlsSection(
            ca_cert=_under(base, self.tls.ca_cert),
            server_cert=_under(base, self.tls.server_cert),
            server_key=_under(base, self.tls.server_key),
        )
        if self.kek.file is not None:
            self.kek = self.kek.model_copy(update={"file": _under(base, self.kek.file)})
        if self.kek.pkcs11 is not None:
            p11 = self.kek.pkcs11.model_copy(
                update={"wrapped_kek_file": _under(base, self.kek.pkcs11.wrapped_kek_file)}
            )
            self.kek = self.kek.model_copy(update={"pkcs11": p11})
        self.peering = self.peering.model_copy(
            update={
                "client_cert": _under(base, self.peering.client_cert),
                "client_key": _under(base, self.peering.client_key),
            }
        )
        self.peers = [peer.model_copy(update={"bundle": _under(base, peer.bundle)}) for peer in self.peers]
        if self.operator.metrics_token_file is not None:
            token_file = _under(base, self.operator.metrics_token_file)
            self.operator = self.operator.model_copy(update={"metrics_token_file": token_file})
        self.siem = _siem_paths(base, self.siem, self.tls.ca_cert)
        trusted = _under(base, self.sae_registry.trusted_ca_dir)
        self.sae_registry = self.sae_registry.model_copy(update={"trusted_ca_dir": trusted})
        peer_ids = [peer.kme_id for peer in self.peers]
        if len(peer_ids) != len(set(peer_ids)) or self.kme.id in peer_ids:
            raise ValueError("peer KME IDs must be unique and differ from this KME's ID")
        self.database = self.database.model_copy(update={"url": _resolve_sqlite(base, self.database.url)})
        ids = [s.id for s in self.saes] + [a.id for a in self.auditors]
        if len(ids) != len(set(ids)):
            raise ValueError("SAE and auditor IDs must be unique")
        link_ids = [link.id for link in self.links]
        if len(link_ids) != len(set(link_ids)):
            raise ValueError("link IDs must be unique")
        return self

    @classmethod
    def load(cls, path: Path) -> KmsSettings:
        """Read the TOML file at ``path``; raise ``ConfigError`` with a readable reason."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        data["config_dir"] = path.resolve().parent
        try:
            return cls(**data)
        except ValueError as exc:
            raise ConfigError(f"config file {path} is invalid: {exc}") from exc


class ConfigError(RuntimeError):
    """The configuration cannot be used; the message says why."""


def _under(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def _siem_paths(base: Path, siem: SiemSection, site_ca: Path) -> SiemSection:
    update: dict[str, Any] = {"state_dir": _under(base, siem.state_dir)}
    if siem.file is not None:
        update["file"] = _under(base, siem.file)
    if siem.syslog is not None:
        sl = siem.syslog
        ca = site_ca if sl.ca_file is None else _under(base, sl.ca_file)
        client = {
            k: _under(base, p)
            for k, p in (("client_cert", sl.client_cert), ("client_key", sl.client_key))
            if p
        }
        update["syslog"] = sl.model_copy(update={"ca_file": ca, **client})
    return siem.model_copy(update=update)


def _resolve_sqlite(base: Path, url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return prefix + str(_under(base, Path(url[len(prefix) :])))
    return url
