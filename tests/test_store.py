"""The store protocol, one suite run against both backends: the embedded store and Milvus (milvus-lite)."""

from __future__ import annotations

import numpy as np
import pytest

import rosetta
from rosetta.errors import RosettaError
from rosetta.store import VectorStore, open_store
from rosetta.store.base import matches, parse_where

DIM = 16
BACKENDS = ["embedded", "milvus"]


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def location(tmp_path, backend: str) -> str:
    if backend == "milvus":
        pytest.importorskip("milvus_lite")
        return str(tmp_path / "milvus.db")
    return str(tmp_path / "store")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def where(tmp_path, backend) -> str:
    return location(tmp_path, backend)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    n = 200
    vectors = unit(rng, n)
    ids = [f"item-{i:03d}" for i in range(n)]
    metadata = [{"n": i, "width": int(rng.integers(100, 1000)), "format": ["jpeg", "png", "webp"][i % 3],
                 "ratio": float(i) / 7} for i in range(n)]
    return ids, vectors, metadata


@pytest.fixture
def store(where, rows):
    ids, vectors, metadata = rows
    s = open_store(where, model="tiny", dim=DIM)
    s.add(ids, vectors, metadata, hashes=[f"h{i}" for i in range(len(ids))])
    yield s
    s.close()


def exact(vectors: np.ndarray, query: np.ndarray, k: int, allowed=None) -> list[int]:
    scores = vectors @ query
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    if allowed is not None:
        order = [i for i in order if i in allowed]
    return order[:k]


def test_open_store_picks_the_backend_and_rosetta_store_is_it(tmp_path, backend, where):
    assert rosetta.Store is open_store
    s = rosetta.Store(where, model="tiny", dim=DIM)
    assert isinstance(s, VectorStore)
    assert type(s).__name__ == {"embedded": "EmbeddedStore", "milvus": "MilvusStore"}[backend]
    assert (s.model, s.dim, len(s)) == ("tiny", DIM, 0)
    assert s.search(np.ones(DIM, np.float32) / 4, k=3) == [[]]
    s.close()


def test_nearest_first_with_scores_and_metadata(store, rows):
    ids, vectors, metadata = rows
    assert len(store) == len(ids)
    results = store.search(vectors[:5], k=7)
    assert len(results) == 5
    for q, hits in enumerate(results):
        assert [h.id for h in hits] == [ids[i] for i in exact(vectors, vectors[q], 7)]
        assert hits[0].id == ids[q] and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[1].score == pytest.approx(float(vectors[q] @ vectors[ids.index(hits[1].id)]), abs=1e-4)
        assert hits[0].metadata == metadata[q]
    single = store.search(vectors[3], k=2)  # one vector [D] is one query
    assert [h.id for h in single[0]] == [h.id for h in results[3][:2]]


def test_persistent_and_remembers_its_model(where, store, rows):
    ids, vectors, _ = rows
    before = store.search(vectors[10], k=5)
    store.close()
    again = open_store(where)  # no model needed to open
    assert (again.model, again.dim, len(again)) == ("tiny", DIM, len(ids))
    assert again.search(vectors[10], k=5) == before
    assert again.hashes()["item-007"] == "h7"
    with pytest.raises(RosettaError, match="built with model 'tiny', not 'vit-b-32'"):
        again.search(vectors[0], model="vit-b-32")
    with pytest.raises(RosettaError, match="built with model 'tiny'"):
        again.add(["x"], vectors[:1], model="vit-b-32")
    with pytest.raises(RosettaError, match="dimension"):
        again.add(["x"], np.ones((1, DIM + 1), np.float32))
    with pytest.raises(RosettaError, match="dimension"):
        again.search(np.ones(DIM + 1, np.float32))
    again.close()
    with pytest.raises(RosettaError, match="not 'vit-b-32'"):
        open_store(where, model="vit-b-32")
    with pytest.raises(RosettaError, match="dimension 16, not 32"):
        open_store(where, model="tiny", dim=32)


def test_no_store_without_a_model(tmp_path, backend):
    with pytest.raises(RosettaError, match="no store here"):
        open_store(location(tmp_path, backend))


def test_dimension_is_set_by_the_first_add(where):
    s = open_store(where, model="tiny")
    assert s.dim is None and len(s) == 0
    s.add(["a", "b"], np.eye(2, 8, dtype=np.float32))
    assert s.dim == 8
    s.close()
    assert open_store(where).dim == 8


def test_update_replaces_and_remove_deletes(store, rows):
    ids, vectors, _ = rows
    store.add(["item-000"], vectors[50:51], [{"n": -1, "format": "gif"}], hashes=["new"])
    assert len(store) == len(ids)
    top = store.search(vectors[50], k=2)[0]
    assert {h.id for h in top} == {"item-000", "item-050"}
    assert store.metadata(["item-000"]) == {"item-000": {"n": -1, "format": "gif"}}
    assert store.hashes()["item-000"] == "new"
    assert store.search(vectors[0], k=1)[0][0].id != "item-000"

    store.remove(["item-050", "item-001", "no-such-id"])
    assert len(store) == len(ids) - 2
    assert store.metadata(["item-050", "item-001", "item-002"]).keys() == {"item-002"}
    found = {h.id for hits in store.search(vectors[:3], k=len(ids)) for h in hits}
    assert "item-050" not in found and "item-001" not in found
    assert len(store.search(vectors[0], k=len(ids))[0]) == len(ids) - 2


@pytest.mark.parametrize("predicate", [
    "width > 512",
    "width <= 300 and format = 'png'",
    "format != 'jpeg' and (n < 20 or n >= 190)",
    "format = \"webp\" or ratio > 27.5",
    "n = 3",
    "missing = 1",
    "format > 'k'",
    "width > 'a string never equals a number'",
])
def test_where_filters_like_the_reference(store, rows, predicate):
    ids, vectors, metadata = rows
    allowed = {i for i, m in enumerate(metadata) if matches(parse_where(predicate), m)}
    for q in (0, 77):
        hits = store.search(vectors[q], k=10, where=predicate)[0]
        assert [h.id for h in hits] == [ids[i] for i in exact(vectors, vectors[q], 10, allowed)]
        assert all(matches(parse_where(predicate), h.metadata) for h in hits)
    assert set(store.hashes(where=predicate)) == {ids[i] for i in allowed}


def test_a_filter_still_returns_k_results(store, rows):
    ids, vectors, _ = rows
    hits = store.search(vectors[0], k=3, where="n = 5 or n = 150 or n = 199")[0]
    assert sorted(h.id for h in hits) == ["item-005", "item-150", "item-199"]
    assert len(store.search(vectors[0], k=50, where="n >= 100")[0]) == 50
    assert len(store.search(vectors[0], k=500, where="n >= 100")[0]) == 100


def test_filter_values_are_data_not_code(store):
    # Quotes, SQL and Milvus syntax inside a string are only characters to compare with.
    for text in ["x' OR 1=1 --", 'x" or metadata["n"] > 0 or "', "a\\'b"]:
        predicate = "format = " + "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
        assert store.search(np.ones(DIM, np.float32) / 4, k=5, where=predicate) == [[]]
    store.add(["odd"], np.ones((1, DIM), np.float32) / 4, [{"format": "it's \"quoted\""}])
    hits = store.search(np.ones(DIM, np.float32) / 4, k=5, where="format = 'it\\'s \"quoted\"'")[0]
    assert [h.id for h in hits] == ["odd"]


def test_bad_predicate_is_one_line(store):
    with pytest.raises(RosettaError) as e:
        store.search(np.ones(DIM, np.float32) / 4, where="width >")
    assert "\n" not in str(e.value) and "width >" in str(e.value)


def test_bad_rows_are_refused(store):
    with pytest.raises(RosettaError, match="2 ids for 1 vectors"):
        store.add(["a", "b"], np.ones((1, DIM), np.float32))
    with pytest.raises(RosettaError, match="twice"):
        store.add(["a", "a"], np.ones((2, DIM), np.float32))
    with pytest.raises(RosettaError, match="NaN"):
        store.add(["a"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(RosettaError, match="not JSON|cannot be stored"):
        store.add(["a"], np.ones((1, DIM), np.float32), [{"x": object()}])
    with pytest.raises(RosettaError, match="k must"):
        store.search(np.ones(DIM, np.float32), k=0)
