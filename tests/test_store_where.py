"""The `where` predicate language: parsed safely, one-line errors, the same meaning in SQLite and Milvus."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rosetta.errors import RosettaError
from rosetta.store.base import Bool, Compare, matches, parse_where, to_sql
from rosetta.store.milvus import to_milvus


def test_parses_comparisons_joined_with_and_or_and_parentheses():
    assert parse_where("width > 512") == Compare("width", ">", 512)
    assert parse_where("format == 'jpeg'") == Compare("format", "=", "jpeg")
    assert parse_where('a != "it\\"s" AND b <= -1.5e3') == Bool(
        "and", (Compare("a", "!=", 'it"s'), Compare("b", "<=", -1500.0)))
    assert parse_where("a = 1 or b = 2 and c = 3") == Bool(
        "or", (Compare("a", "=", 1), Bool("and", (Compare("b", "=", 2), Compare("c", "=", 3)))))
    assert parse_where("(a = 1 or b = 2) and c >= 3") == Bool(
        "and", (Bool("or", (Compare("a", "=", 1), Compare("b", "=", 2))), Compare("c", ">=", 3)))


@pytest.mark.parametrize("text, message", [
    ("width >", "expected a number or a quoted string, but the predicate ends there"),
    ("width 512", "expected a comparison"),
    ("> 512", "expected a metadata key"),
    ("width > 512 and", "expected a metadata key"),
    ("(width > 512", "expected ')'"),
    ("width > 512)", "expected 'and', 'or' or the end at position 12"),
    ("width > 'open", "unexpected character \"'\" at position 9"),
    ("width > 5px", "unexpected character '5' at position 9"),
    ("width; DROP TABLE rows", "unexpected character ';'"),
    ("__import__('os').system('x')", "unexpected character '.' at position 17"),
    ("width > foo", "expected a number or a quoted string"),
    ("", "expected a metadata key"),
])
def test_bad_predicates_say_what_and_where_in_one_line(text, message):
    with pytest.raises(RosettaError) as e:
        parse_where(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_milvus_expression_quotes_strings_itself():
    predicate = parse_where("format = 'a\"b\\\\c' and (w > 2 or w < -1.5)")
    assert to_milvus(predicate) == (
        '(metadata["format"] == "a\\"b\\\\c") and ((metadata["w"] > 2) or (metadata["w"] < -1.5))')


keys = st.sampled_from(["a", "b", "s"])
values = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, -1.5]), st.sampled_from(["x", "y", "it's", ""]))
compares = st.builds(Compare, keys, st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), values)
predicates = st.recursive(compares, lambda inner: st.builds(
    Bool, st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3).map(tuple)), max_leaves=6)
rows = st.lists(st.dictionaries(keys, st.one_of(st.integers(-3, 3), st.sampled_from(["x", "y", "it's", "", 0.5]),
                                                st.booleans())), min_size=1, max_size=8)


def render(p) -> str:
    if isinstance(p, Compare):
        value = p.value if not isinstance(p.value, str) else "'" + p.value.replace("'", "\\'") + "'"
        return f"{p.key} {p.op} {value}"
    return "(" + f" {p.op} ".join(render(item) for item in p.items) + ")"


@settings(max_examples=60, deadline=None)
@given(predicate=predicates, data=rows)
def test_sqlite_translation_means_what_the_reference_means(predicate, data):
    assert _flatten(parse_where(render(predicate))) == _flatten(predicate)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (i INTEGER, metadata TEXT)")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(i, json.dumps(m)) for i, m in enumerate(data)])
    sql, params = to_sql(predicate)
    got = {i for (i,) in db.execute(f"SELECT i FROM t WHERE {sql}", params)}
    assert got == {i for i, m in enumerate(data) if matches(predicate, m)}


def _flatten(p):
    """`a and (b and c)` as `a and b and c`, to compare parses of the same meaning."""
    if isinstance(p, Compare):
        return p
    items = []
    for item in map(_flatten, p.items):
        items += item.items if isinstance(item, Bool) and item.op == p.op else [item]
    return Bool(p.op, tuple(items))
