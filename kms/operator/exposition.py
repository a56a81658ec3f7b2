"""``/metrics``: the process instruments of every KME process (``kms.telemetry.metrics``) plus the
shared figures read from the database (``kms.service.operator_metrics``), in Prometheus text format.

Names follow Prometheus conventions: prefix ``qkms_``, base units (seconds, ratios, and bytes for
key material: a link's bits / 8, as ``promtool check metrics`` asks), counters end in ``_total``. When the database does not answer, ``qkms_database_up`` is 0 and the
database-derived families are left out (an old figure would look current); the scrape still answers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kms import __version__
from kms.config import KmsSettings
from kms.service.operator_metrics import DbFigures, OperatorMetrics, certificate_expiry
from kms.telemetry.metrics import process_registry


class SharedFigures(Collector):
    """Families read at scrape time, the same whichever process is scraped."""

    def __init__(
        self,
        metrics: OperatorMetrics,
        settings: KmsSettings,
        processes: int,
        peers_down: Callable[[], frozenset[str]],
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.processes = processes
        self.peers_down = peers_down

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("qkms_build_info", "KME build; always 1.", labels=["version", "python"])
        build.add_metric([__version__, sys.version.split()[0]], 1)
        yield build
        yield GaugeMetricFamily(
            "qkms_api_processes",
            "Processes serving the ETSI API (qkms serve --workers).",
            value=self.processes,
        )
        certs = GaugeMetricFamily(
            "qkms_certificate_expiry_timestamp_seconds",
            "When the KME's own certificates expire (Unix time), by role.",
            labels=["role"],
        )
        for role, stamp in sorted(certificate_expiry(self.settings).items()):
            certs.add_metric([role], stamp)
        yield certs
        yield _peers_up(self.settings, self.peers_down)
        started = time.monotonic()
        try:
            figures = self.metrics.figures()
        except Exception:
            figures = None
        yield GaugeMetricFamily(
            "qkms_database_up",
            "1 when the database answered this scrape in time.",
            value=int(figures is not None),
        )
        yield GaugeMetricFamily(
            "qkms_database_scrape_duration_seconds",
            "Time to read the database figures of this scrape.",
            value=time.monotonic() - started,
        )
        if figures is not None:
            yield from _link_families(figures)
            yield from _key_families(figures)
            yield from _audit_and_peer_families(figures)
            yield from _siem_families(figures)


def _link_families(f: DbFigures) -> Iterable[Metric]:
    up = GaugeMetricFamily(
        "qkms_link_up", "1 when the link is active (0: suspended or otherwise).", labels=["link", "peer_kme"]
    )
    state = GaugeMetricFamily(
        "qkms_link_state", "The link's state (1 for the current one).", labels=["link", "state"]
    )
    pool = GaugeMetricFamily(
        "qkms_link_pool_bytes",
        "Unserved key material held for the link (bits / 8): own (this KME cuts it) or mirror (the peer KME does).",
        labels=["link", "owner"],
    )
    pending = GaugeMetricFamily(
        "qkms_link_unconfirmed_blocks", "Pieces waiting for the peer KME's confirmation.", labels=["link"]
    )
    produced = CounterMetricFamily(
        "qkms_link_secret_bytes",
        "Secret key material the link delivered into the pool (bits / 8).",
        labels=["link"],
    )
    served = CounterMetricFamily(
        "qkms_link_served_bytes",
        "Key material of this KME's own pieces cut into keys (bits / 8).",
        labels=["link"],
    )
    qber = GaugeMetricFamily(
        "qkms_link_qber_ratio", "QBER of the link's newest stored block (0..1).", labels=["link"]
    )
    empty = GaugeMetricFamily(
        "qkms_link_pool_seconds_until_empty",
        "Own pool divided by the draw over the last minutes (+Inf when nothing is drawn).",
        labels=["link"],
    )
    for link in f.links:
        up.add_metric([link.link_id, link.peer_kme_id], int(link.state == "active"))
        state.add_metric([link.link_id, link.state], 1)
        pool.add_metric([link.link_id, "own"], link.own_bits / 8)
        pool.add_metric([link.link_id, "mirror"], link.mirror_bits / 8)
        pending.add_metric([link.link_id], link.unconfirmed_blocks)
        produced.add_metric([link.link_id], link.produced_bits / 8)
        served.add_metric([link.link_id], link.served_bits / 8)
        if link.qber is not None:
            qber.add_metric([link.link_id], link.qber)
        if link.seconds_until_empty is not None:
            empty.add_metric([link.link_id], link.seconds_until_empty)
    return [up, state, pool, pending, produced, served, qber, empty]


def _key_families(f: DbFigures) -> Iterable[Metric]:
    by_state = GaugeMetricFamily("qkms_keys", "Keys in the store by lifecycle state.", labels=["state"])
    for state, count in sorted(f.keys_by_state.items()):
        by_state.add_metric([state], count)
    pair_state = GaugeMetricFamily(
        "qkms_pair_keys",
        "Keys by SAE pair, policy and state.",
        labels=["master_sae", "slave_sae", "policy", "state"],
    )
    delivered = CounterMetricFamily(
        "qkms_pair_keys_delivered",
        "Keys delivered to an SAE pair, by policy (qkd, hybrid, pqc_fallback).",
        labels=["master_sae", "slave_sae", "policy"],
    )
    totals: dict[tuple[str, str, str], int] = {}
    for p in f.pairs:
        pair_state.add_metric([p.master_sae_id, p.slave_sae_id, p.policy, p.state], p.keys)
        key = (p.master_sae_id, p.slave_sae_id, p.policy)
        totals[key] = totals.get(key, 0) + p.keys
    for labels, count in sorted(totals.items()):
        delivered.add_metric(list(labels), count)
    return [by_state, pair_state, delivered]


def _audit_and_peer_families(f: DbFigures) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        "qkms_audit_head_sequence", "Sequence number of the newest audit record.", value=f.audit_head_seq
    )
    yield GaugeMetricFamily(
        "qkms_audit_unsigned_records",
        "Audit records after the newest signed checkpoint (a checkpoint is due for them).",
        value=f.unsigned_records,
    )
    if f.checkpoint_age_seconds is not None:
        yield GaugeMetricFamily(
            "qkms_audit_checkpoint_age_seconds",
            "Age of the newest signed audit checkpoint.",
            value=f.checkpoint_age_seconds,
        )
        yield GaugeMetricFamily(
            "qkms_audit_checkpoint_number",
            "Number of the newest signed audit checkpoint.",
            value=f.checkpoint_number or 0,
        )
    peers = GaugeMetricFamily(
        "qkms_peer_last_message_age_seconds",
        "Seconds since the newest accepted message from each peer KME.",
        labels=["peer"],
    )
    for peer, age in sorted(f.peer_message_age_seconds.items()):
        peers.add_metric([peer], age)
    yield peers


def _siem_families(f: DbFigures) -> Iterable[Metric]:
    """Audit to SIEM (D-33): how far each configured sink is behind the audit head."""
    records = GaugeMetricFamily(
        "qkms_siem_lag_records",
        "Audit records not yet known delivered to the SIEM sink (audit head minus shipped position).",
        labels=["sink"],
    )
    seconds = GaugeMetricFamily(
        "qkms_siem_lag_seconds",
        "Age of the oldest audit record not yet known delivered to the SIEM sink (0 when none waits).",
        labels=["sink"],
    )
    shipped = GaugeMetricFamily(
        "qkms_siem_shipped_sequence",
        "Sequence number of the newest audit record known delivered to the SIEM sink.",
        labels=["sink"],
    )
    for lag in f.siem_lag:
        records.add_metric([lag.sink], lag.records_behind)
        seconds.add_metric([lag.sink], lag.seconds_behind)
        shipped.add_metric([lag.sink], lag.shipped_seq)
    return [records, seconds, shipped]


def _peers_up(settings: KmsSettings, peers_down: Callable[[], frozenset[str]]) -> Metric:
    """Adjacent peers (those with a URL) as this process's peer client last found them."""
    up = GaugeMetricFamily(
        "qkms_peer_up",
        "1 unless the serving process's last message to the adjacent peer KME failed or went unanswered.",
        labels=["peer"],
    )
    down = peers_down()
    for peer in sorted(p.kme_id for p in settings.peers if p.url):
        up.add_metric([peer], int(peer not in down))
    return up


class Exposition:
    """Renders one scrape."""

    def __init__(
        self,
        metrics: OperatorMetrics,
        settings: KmsSettings,
        processes: int,
        peers_down: Callable[[], frozenset[str]],
    ) -> None:
        self.shared = SharedFigures(metrics, settings, processes, peers_down)

    def render(self) -> bytes:
        registry = CollectorRegistry()
        registry.register(self.shared)
        return generate_latest(process_registry()) + generate_latest(registry)
