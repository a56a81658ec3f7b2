"""A KME with a paired test link (``random`` with a shared seed, as every pilot has) restarted: its
source began again at block 1, whose bits depend only on the number, so the filler was handed blocks
it already held; every run was refused as duplicates (unique source block) until the count passed
the old numbers (found by a restore test, issue 16). The source now resumes after the newest block
stored for its link."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from kms.config import KmsSettings
from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network
from kms.runtime.assembly import build_runtime
from kms.storage.schema import key_blocks


def _block_ids(config: Path) -> tuple[int, set[str]]:
    rt = build_runtime(KmsSettings.load(config), sync_registry=False)
    try:
        with rt.db.read() as conn:
            rows = conn.execute(select(key_blocks.c.source_block_id)).scalars().all()
            count = conn.execute(select(func.count()).select_from(key_blocks)).scalar_one()
        return int(count), set(rows)
    finally:
        rt.close()


def test_a_restarted_kme_resumes_its_paired_source_after_the_blocks_it_holds(tmp_path: Path) -> None:
    sites = prepare_network(
        tmp_path,
        [SiteSpec("KME-A", ("SAE-A",)), SiteSpec("KME-B", ("SAE-B",))],
        [LinkSpec("link-ab", "KME-A", "KME-B", options={"block_bits": 65536})],
    )
    config = sites["KME-A"].config_path
    for _start in range(2):  # two lives of the same KME, each with a new filler and source
        rt = build_runtime(KmsSettings.load(config))
        try:
            assert rt.make_filler().fill_once(max_events=4) > 0
        finally:
            rt.close()
    count, ids = _block_ids(config)
    assert ids == {f"rnd-{n}" for n in range(1, 9)}, sorted(ids)  # 1-4, then 5-8: none again
    assert count >= len(ids)
