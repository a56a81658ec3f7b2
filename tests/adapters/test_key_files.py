"""KeyFileSource on real files: order, partial files, key hygiene, bad files, provenance, both ends."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from qkd_adapters.key_files import KeyFileSource
from qkd_adapters.keyblock import KeyBlock, KeySource, KeySourceError, LinkAlarm


def write_block(
    directory: Path, block_id: str, material: bytes, sidecar: dict[str, Any] | None = None
) -> None:
    """The documented writer convention: temp names, sidecar renamed into place first, key last."""
    directory.mkdir(parents=True, exist_ok=True)
    if sidecar is not None:
        tmp = directory / f"{block_id}.json.tmp"
        tmp.write_text(json.dumps(sidecar))
        tmp.rename(directory / f"{block_id}.json")
    tmp = directory / f"{block_id}.key.tmp"
    tmp.write_bytes(material)
    tmp.rename(directory / f"{block_id}.key")


def pull_all(source: KeySource) -> list[KeyBlock | LinkAlarm]:
    events: list[KeyBlock | LinkAlarm] = []
    while batch := source.pull(max_events=16):
        events.extend(batch)
    return events


def test_blocks_come_in_name_order_once_each(tmp_path: Path) -> None:
    for n in (3, 1, 2):
        write_block(tmp_path, f"blk-{n:04d}", bytes([n]) * 32)
    source = KeyFileSource("lk", tmp_path)
    assert isinstance(source, KeySource)
    first = source.pull(max_events=2)
    rest = source.pull(max_events=2)
    assert [e.block_id for e in first] == ["blk-0001", "blk-0002"]
    assert [e.block_id for e in rest] == ["blk-0003"]
    assert source.pull() == []
    for event in [*first, *rest]:
        assert isinstance(event, KeyBlock)
        assert event.bit_length == 256 and event.link_id == "lk"
        assert event.material == bytes([int(event.block_id[-1])]) * 32
    assert list(tmp_path.iterdir()) == []


def test_partial_and_hidden_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "blk-0001.key.tmp").write_bytes(b"\x01" * 16)
    (tmp_path / "blk-0002.key.part").write_bytes(b"\x02" * 16)
    (tmp_path / ".blk-0003.key").write_bytes(b"\x03" * 16)
    (tmp_path / "notes.txt").write_text("not a key")
    source = KeyFileSource("lk", tmp_path)
    assert source.pull() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".blk-0003.key",
        "blk-0001.key.tmp",
        "blk-0002.key.part",
        "notes.txt",
    ]
    (tmp_path / "blk-0001.key.tmp").rename(tmp_path / "blk-0001.key")  # the writer finishes
    assert [e.block_id for e in source.pull()] == ["blk-0001"]


def test_settle_seconds_waits_for_writers_that_cannot_rename(tmp_path: Path) -> None:
    (tmp_path / "blk-0001.key").write_bytes(b"\x05" * 16)
    source = KeyFileSource("lk", tmp_path, settle_seconds=30)
    assert source.pull() == []
    old = time.time() - 60
    os.utime(tmp_path / "blk-0001.key", (old, old))
    assert [e.block_id for e in source.pull()] == ["blk-0001"]


def test_used_file_is_overwritten_with_zeros_then_deleted(tmp_path: Path) -> None:
    material = os.urandom(64)
    write_block(tmp_path / "in", "blk-0001", material, {"bit_length": 512})
    # A second hard link sees the same inode: what the adapter left in it after use.
    witness = tmp_path / "witness"
    os.link(tmp_path / "in" / "blk-0001.key", witness)
    [block] = KeyFileSource("lk", tmp_path / "in").pull()
    assert isinstance(block, KeyBlock) and block.material == material
    assert not (tmp_path / "in" / "blk-0001.key").exists()
    assert not (tmp_path / "in" / "blk-0001.json").exists()
    assert witness.read_bytes() == bytes(64)


@pytest.mark.parametrize(
    ("material", "sidecar", "problem"),
    [
        (b"", None, "key file is empty"),
        (b"\xab" * 32, {"bit_length": 512}, "sidecar declares 512 bits but the key file holds 32 bytes"),
        (b"\xab" * 32, "{not json", "sidecar is not valid JSON"),
        (b"\xab" * 32, {"qber": "low"}, "sidecar field qber must be a number"),
        (b"\xab" * 32, {"is_qkd": "yes"}, "sidecar field is_qkd must be true or false"),
        (b"\xab" * 32, [1, 2], "sidecar must hold a JSON object"),
    ],
)
def test_bad_files_raise_an_alarm_without_material(
    tmp_path: Path, material: bytes, sidecar: Any, problem: str
) -> None:
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (tmp_path / "blk-0001.json").write_text(text)
    (tmp_path / "blk-0001.key").write_bytes(material)
    write_block(tmp_path, "blk-0002", b"\x11" * 16)
    events = KeyFileSource("lk", tmp_path).pull()
    assert [type(e) for e in events] == [LinkAlarm, KeyBlock]
    alarm = events[0]
    assert isinstance(alarm, LinkAlarm)
    assert alarm.block_id == "blk-0001" and alarm.link_id == "lk"
    assert problem in alarm.reason and alarm.details["code"] == "key-file-rejected"
    rendered = f"{alarm.reason} {alarm.details}"
    assert "ab" * 8 not in rendered and "\xab" not in rendered
    assert list(tmp_path.iterdir()) == []  # rejected bits are destroyed too, never retried


def test_bad_block_id_and_missing_required_sidecar(tmp_path: Path) -> None:
    (tmp_path / "bad name!.key").write_bytes(b"\x01" * 8)
    write_block(tmp_path, "blk-0001", b"\x02" * 8)
    events = KeyFileSource("lk", tmp_path, require_sidecar=True).pull()
    assert all(isinstance(e, LinkAlarm) for e in events) and len(events) == 2
    assert events[0].block_id is None and "not a valid block ID" in events[0].reason
    assert "sidecar file is missing" in events[1].reason


def test_provenance_is_what_the_files_and_options_declare(tmp_path: Path) -> None:
    write_block(tmp_path, "blk-0001", b"\x01" * 8)
    write_block(
        tmp_path,
        "blk-0002",
        b"\x02" * 8,
        {
            "protocol": "cow",
            "is_qkd": True,
            "qber": 0.021,
            "distance_km": 42.5,
            "epsilon_sec": 1e-9,
            "leaked_bits": 1234,
            "produced_at": "2026-01-02T03:04:05+00:00",
            "vendor_serial": "X-17",
        },
    )
    write_block(tmp_path, "blk-0003", b"\x03" * 8, {"is_qkd": False})
    plain, declared, denied = KeyFileSource("lk", tmp_path).pull()
    assert isinstance(plain, KeyBlock) and isinstance(declared, KeyBlock) and isinstance(denied, KeyBlock)
    assert plain.provenance.is_qkd is False and plain.provenance.adapter == "key-files"
    assert plain.provenance.details["is_qkd_declared_by"] == "option"
    p = declared.provenance
    assert p.is_qkd is True and p.protocol == "cow" and p.qber == 0.021 and p.distance_km == 42.5
    assert p.epsilon_sec == 1e-9 and p.leaked_bits == 1234 and p.produced_at.year == 2026
    assert p.details["sidecar_fields"] == {"vendor_serial": "X-17"}
    assert denied.provenance.is_qkd is False

    write_block(tmp_path, "blk-0004", b"\x04" * 8)
    write_block(tmp_path, "blk-0005", b"\x05" * 8, {"is_qkd": False})
    opted, overridden = KeyFileSource("lk", tmp_path, is_qkd=True, protocol="decoy-bb84").pull()
    assert opted.provenance.is_qkd is True and opted.provenance.protocol == "decoy-bb84"  # type: ignore[union-attr]
    assert overridden.provenance.is_qkd is False  # type: ignore[union-attr]


def test_sidecar_bit_length_trims_the_last_byte(tmp_path: Path) -> None:
    write_block(tmp_path, "blk-0001", b"\xff" * 4, {"bit_length": 29})
    [block] = KeyFileSource("lk", tmp_path).pull()
    assert isinstance(block, KeyBlock)
    assert block.bit_length == 29 and block.material == b"\xff\xff\xff\xf8"


def test_both_ends_read_identical_blocks(tmp_path: Path) -> None:
    shared = [(f"2026-01-01T00-00-{n:02d}", os.urandom(128)) for n in range(5)]
    for end in ("alice", "bob"):
        for block_id, material in shared:
            write_block(tmp_path / end, block_id, material, {"is_qkd": True, "protocol": "decoy-bb84"})
    alice = pull_all(KeyFileSource("lk", tmp_path / "alice"))
    bob = pull_all(KeyFileSource("lk", tmp_path / "bob"))
    assert len(alice) == len(bob) == 5
    for a, b in zip(alice, bob, strict=True):
        assert isinstance(a, KeyBlock) and isinstance(b, KeyBlock)
        assert (a.block_id, a.material, a.bit_length) == (b.block_id, b.material, b.bit_length)
    assert [a.block_id for a in alice] == [block_id for block_id, _ in shared]


def test_unreadable_directory_is_a_source_error(tmp_path: Path) -> None:
    source = KeyFileSource("lk", tmp_path / "missing")
    with pytest.raises(KeySourceError, match="cannot be read"):
        source.pull()
    source.close()
    assert source.pull() == []


def test_pull_waits_up_to_timeout_for_a_file(tmp_path: Path) -> None:
    source = KeyFileSource("lk", tmp_path)
    started = time.monotonic()
    assert source.pull(timeout=0.3) == []
    assert 0.25 <= time.monotonic() - started < 2


def test_a_symlink_is_rejected_and_its_target_left_intact(tmp_path: Path) -> None:
    target = tmp_path / "precious.bin"
    target.write_bytes(b"\x42" * 32)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blk-0001.key").symlink_to(target)
    [alarm] = KeyFileSource("lk", tmp_path / "in").pull()
    assert isinstance(alarm, LinkAlarm) and "not a regular file" in alarm.reason
    assert target.read_bytes() == b"\x42" * 32
    assert list((tmp_path / "in").iterdir()) == []


def test_oversized_sidecar_and_key_file_are_rejected(tmp_path: Path) -> None:
    write_block(tmp_path, "blk-0001", b"\x01" * 64)
    (tmp_path / "blk-0002.json").write_text(json.dumps({"pad": "x" * (1 << 20)}))
    write_block(tmp_path, "blk-0002", b"\x02" * 8)
    big, sidecar = KeyFileSource("lk", tmp_path, max_block_bytes=32).pull()
    assert isinstance(big, LinkAlarm) and "more than max_block_bytes" in big.reason
    assert isinstance(sidecar, LinkAlarm) and "sidecar is larger" in sidecar.reason
