"""The pool filler's counts: blocks delivered and aborted by reason, alarms by kind (a real KME
runtime on SQLite, its filler pulling from the random source and handed alarms as an adapter would
raise them)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kms.config import KmsSettings
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import build_runtime
from kms.telemetry import metrics
from qkd_adapters.keyblock import LinkAlarm


def counts() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.process_registry()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_filler_counts_blocks_and_alarms(tmp_path: Path) -> None:
    metrics.enable()  # this test process: a registry of its own (no multiprocess directory)
    res = init_workdir(tmp_path / "kme", "KME-F", ["A", "B"], link_source="random")
    runtime = build_runtime(KmsSettings.load(res.config_path))
    try:
        link = runtime.settings.links[0].id
        filler = runtime.make_filler()
        delivered = ("qkms_link_blocks_total", (("link", link), ("outcome", "delivered"), ("reason", "")))
        before = counts()
        assert filler.fill_once() > 0
        assert counts()[delivered] > before.get(delivered, 0.0)

        aborted = (
            "qkms_link_blocks_total",
            (("link", link), ("outcome", "aborted"), ("reason", "no-positive-key-length")),
        )
        alarm = ("qkms_link_alarms_total", (("kind", "no-positive-key-length"), ("link", link)))
        odd = ("qkms_link_alarms_total", (("kind", "other"), ("link", link)))
        base = counts()
        filler.handle_alarm(LinkAlarm(link, "blk-1", "no key", details={"code": "no-positive-key-length"}))
        filler.handle_alarm(LinkAlarm(link, None, "Device says: <script>", details={}))
        after = counts()
        assert after[aborted] == base.get(aborted, 0.0) + 1
        assert after[alarm] == base.get(alarm, 0.0) + 1
        assert after[odd] == base.get(odd, 0.0) + 1  # a free-text reason never becomes a label value
    finally:
        runtime.close()
