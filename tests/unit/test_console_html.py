"""The console's HTML builder and SVG charts escape every value (a link ID, an SAE ID or an audit
record's text can never become markup), and console passwords hash and check as scrypt."""

from __future__ import annotations

import pytest

from kms.crypto.passwords import DUMMY_HASH, PasswordRejected, hash_password, verify_password
from kms.operator.console import svg
from kms.operator.console.html import Html, esc, table, tag, void

HOSTILE = '<script>alert("x")</script>&'


def test_text_and_attributes_are_escaped_and_fragments_pass() -> None:
    out = tag("a", HOSTILE, href=f"/console/links/{HOSTILE}", class_="k", hidden=True, skipped=None)
    assert "<script" not in out and "&lt;script&gt;" in out and "&quot;x&quot;" in out
    assert (
        out.startswith('<a href="/console/links/&lt;script&gt;')
        and " hidden>" in out
        and "skipped" not in out
    )
    assert esc(Html("<b>ok</b>")) == "<b>ok</b>" and esc("<b>") == "&lt;b&gt;"
    assert void("input", name="csrf", value='a"b') == '<input name="csrf" value="a&quot;b">'
    cells = table(["h<1>"], [[HOSTILE, tag("td", "kept", class_="num")]])
    assert "<th>h&lt;1&gt;</th>" in cells and '<td class="num">kept</td>' in cells and "<td><td" not in cells


def test_charts_escape_labels_and_scale_to_round_bounds() -> None:
    graph = svg.graph(["KME-A", HOSTILE], [("KME-A", HOSTILE, HOSTILE, "down")], "KME-A")
    assert "<script" not in graph and 'data-state="down"' in graph and 'stroke-dasharray="6 4"' in graph
    spark = svg.sparkline([None, 0.02, None, 0.01, 0.03], HOSTILE)
    assert "<script" not in spark and spark.count("<circle") == 1 and spark.count("<polyline") == 1
    chart = svg.line_chart([None, None], ("a", "b"), " b/s", "empty")
    assert "no data in this hour" in chart
    assert [svg._nice(v) for v in (0.0, 0.033, 7.0, 1200.0)] == [1.0, 0.05, 10.0, 2000.0]


def test_passwords_hash_with_scrypt_and_check() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$15$8$1$") and "correct" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    assert not verify_password("anything", "not-a-hash") and not verify_password("anything", DUMMY_HASH)
    assert len(DUMMY_HASH.split("$")) == 6  # well formed, so an unknown name costs a real KDF run
    with pytest.raises(PasswordRejected, match="at least 12 characters"):
        hash_password("short")
