"""The paired test source (``shared_seed``): both ends get the same blocks, and no two blocks share
bits. It once used the block number as AES-CTR's whole initial counter block, so block k+1 was block
k shifted by 16 bytes and a two-site KME served the same key bytes under different key_IDs (found by
tests/chaos/test_peer_kill.py)."""

from __future__ import annotations

from qkd_adapters.keyblock import KeyBlock
from qkd_adapters.random_source import RandomTestSource


def _blocks(seed: str, n: int, block_bits: int = 65536) -> list[KeyBlock]:
    source = RandomTestSource("link-ab", block_bits=block_bits, shared_seed=seed)
    blocks = [b for b in source.pull(max_events=n) if isinstance(b, KeyBlock)]
    assert len(blocks) == n
    return blocks


def test_both_ends_expand_the_seed_into_the_same_numbered_blocks() -> None:
    a, b = _blocks("s", 3), _blocks("s", 3)
    assert [x.block_id for x in a] == [x.block_id for x in b] == ["rnd-1", "rnd-2", "rnd-3"]
    assert [x.material for x in a] == [x.material for x in b]
    assert [x.material for x in _blocks("other", 3)] != [x.material for x in a]


def test_no_16_byte_chunk_repeats_across_blocks() -> None:
    blocks = _blocks("s", 8)
    chunks = [blk.material[i : i + 16] for blk in blocks for i in range(0, len(blk.material), 16)]
    assert len(chunks) == 8 * 65536 // 128
    assert len(set(chunks)) == len(chunks), "two blocks share keystream: keys would repeat"
