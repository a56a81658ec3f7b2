"""A KME restarted never stores the same key bits twice, whatever its link's source.

Found by a restore test (issue 16): a paired test source (``random`` with a shared seed, as every
pilot has) began again at block 1 on a restart; block k's bits depend only on k, so the filler was
handed blocks it already held, and every run was refused as duplicates (unique source block) until
the count passed the old numbers. The source now resumes after the newest block stored for its link.
The family: each kind of source, two lives of the KME, every stored block's bits distinct.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from kms.config import KmsSettings
from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network
from kms.runtime.assembly import Runtime, build_runtime
from kms.storage.pool_repository import block_aad
from kms.storage.schema import key_blocks

BLOCK_BYTES = 8192


def _drop_key_files(directory: Path, life: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(4):
        (directory / f"blk-{life}-{n:04d}.key").write_bytes(os.urandom(BLOCK_BYTES))


def _materials(rt: Runtime) -> list[bytes]:
    cols = (key_blocks.c.link_id, key_blocks.c.source_block_id, key_blocks.c.source_offset_bits)
    with rt.db.read() as conn:
        rows = conn.execute(
            select(*cols, key_blocks.c.next_bit, key_blocks.c.material, key_blocks.c.kek_id)
        ).all()
    return [rt.envelope.open(bytes(m), block_aad(lk, src, off, nb), kek) for lk, src, off, nb, m, kek in rows]


@pytest.mark.parametrize("source", ["random", "key-files"])
def test_a_restarted_kme_never_stores_the_same_bits_twice(tmp_path: Path, source: str) -> None:
    files = tmp_path / "key-files"
    options = {"block_bits": BLOCK_BYTES * 8} if source == "random" else {"directory": str(files)}
    sites = prepare_network(
        tmp_path / "sites",
        [SiteSpec("KME-A", ("SAE-A",)), SiteSpec("KME-B", ("SAE-B",))],
        [LinkSpec("link-ab", "KME-A", "KME-B", source, options)],
    )
    config = sites["KME-A"].config_path
    for life in range(2):  # two lives of the same KME, each with a new filler and source
        if source == "key-files":
            _drop_key_files(files, life)
        rt = build_runtime(KmsSettings.load(config))
        try:
            assert rt.make_filler().fill_once(max_events=4) > 0, f"life {life} stored nothing"
        finally:
            rt.close()
    rt = build_runtime(KmsSettings.load(config), sync_registry=False)
    try:
        materials = _materials(rt)
    finally:
        rt.close()
    assert len(materials) >= 8
    assert len(set(materials)) == len(materials), "a block's bits were stored twice"
