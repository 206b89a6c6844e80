"""What only the embedded store does: IVF or HNSW past a threshold, an index file reconciled with SQLite, several
handles on one directory."""

from __future__ import annotations

import shutil
import sqlite3

import faiss
import numpy as np
import pytest

from rosetta.errors import RosettaError
from rosetta.store.embedded import DB_FILE, INDEX_FILE, EmbeddedStore, IndexParams

DIM = 32


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    vectors = unit(rng, 1200)
    ids = [f"v{i}" for i in range(len(vectors))]
    metadata = [{"i": i, "even": "yes" if i % 2 == 0 else "no"} for i in range(len(vectors))]
    return ids, vectors, metadata


def ids_of(hits) -> list[str]:
    return [h.id for h in hits]


def exact_ids(ids, vectors, query, k, keep=lambda i: True):
    order = [int(i) for i in np.argsort(-(vectors @ query)) if keep(int(i))]
    return [ids[i] for i in order[:k]]


APPROXIMATE = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}


def recall_at_10(store, ids, vectors) -> float:
    queries = vectors[:50] * 0.7 + unit(np.random.default_rng(2), 50) * 0.7
    return float(np.mean([len(set(ids_of(hits)) & set(exact_ids(ids, vectors, q, 10))) / 10
                          for q, hits in zip(queries, store.search(queries, k=10))]))


@pytest.mark.parametrize("ann", APPROXIMATE)
def test_exact_below_the_threshold_approximate_past_it(tmp_path, data, ann):
    ids, vectors, metadata = data
    store = EmbeddedStore(tmp_path / "s", model="m", ann_threshold=1000, ann=ann, hnsw_m=16, ef_construction=80,
                          ef_search=128, nprobe=8)
    store.add(ids[:900], vectors[:900], metadata[:900])
    assert isinstance(store._index, faiss.IndexFlat)
    assert recall_at_10(store, ids[:900], vectors[:900]) == 1.0
    store.add(ids[900:], vectors[900:], metadata[900:])
    assert isinstance(store._index, APPROXIMATE[ann])
    assert recall_at_10(store, ids, vectors) >= (0.9 if ann == "hnsw" else 0.5)  # IVF: 8 of 30 lists, 32-d
    store.close()
    reopened = EmbeddedStore(tmp_path / "s", nprobe=30)
    assert isinstance(reopened._index, APPROXIMATE[ann]) and reopened._index.ntotal == len(ids)
    assert reopened.params.ann_threshold == 1000 and reopened.params.ann == ann and reopened.params.hnsw_m == 16
    if ann == "ivf":  # every list probed: exact
        assert reopened._index.nlist == 30 and recall_at_10(reopened, ids, vectors) == 1.0
    with pytest.raises(RosettaError, match=f"created with ann={ann}"):
        EmbeddedStore(tmp_path / "s", ann="hnsw" if ann == "ivf" else "ivf")


def test_ivf_lists_are_retrained_when_twice_as_many_are_due(tmp_path):
    rng = np.random.default_rng(3)
    vectors = unit(rng, 5000)
    ids = [f"v{i}" for i in range(len(vectors))]
    store = EmbeddedStore(tmp_path / "s", model="m", ann_threshold=1000, nprobe=4)
    store.add(ids[:1000], vectors[:1000])
    assert store._index.nlist == IndexParams.ivf_lists(1000) == 25  # 39 training vectors a list
    store.add(ids[1000:1900], vectors[1000:1900])  # 48 lists due: the same 25
    assert store._index.nlist == 25 and store._index.ntotal == 1900
    store.add(ids[1900:], vectors[1900:])
    assert store._index.nlist == IndexParams.ivf_lists(5000) == 128 and store._index.ntotal == 5000
    assert IndexParams.ivf_lists(1_000_000) == 4000  # 4 sqrt(n) for large n
    assert [h.id for h in store.search(vectors[4321], k=1)[0]] == [ids[4321]]


def test_a_store_made_before_ivf_keeps_hnsw(tmp_path, data):
    ids, vectors, metadata = data
    EmbeddedStore(tmp_path / "s", model="m", ann_threshold=500).close()
    db = sqlite3.connect(tmp_path / "s" / DB_FILE)
    with db:
        db.execute("DELETE FROM meta WHERE key IN ('ann', 'nprobe')")
    db.close()
    store = EmbeddedStore(tmp_path / "s")
    store.add(ids, vectors, metadata)
    assert store.params.ann == "hnsw" and isinstance(store._index, faiss.IndexHNSWFlat)


def test_a_zero_threshold_starts_approximate_with_the_first_rows(tmp_path, data):
    ids, vectors, metadata = data
    store = EmbeddedStore(tmp_path / "s", model="m", ann_threshold=0)
    store.add(ids[:2], vectors[:2], metadata[:2])
    assert isinstance(store._index, faiss.IndexIVFFlat) and store._index.nlist == 1
    assert ids_of(store.search(vectors[1], k=1)[0]) == [ids[1]]
    store.remove(ids[:2])  # all gone: rebuilt empty, still searchable
    assert store.search(vectors[1], k=1) == [[]]


def test_an_unknown_index_kind_is_refused(tmp_path):
    with pytest.raises(RosettaError, match="'ivf' or 'hnsw'"):
        EmbeddedStore(tmp_path / "s", model="m", ann="lsh")


@pytest.mark.parametrize("ann", APPROXIMATE)
def test_approximate_deletes_are_masked_then_rebuilt(tmp_path, data, ann):
    ids, vectors, metadata = data
    store = EmbeddedStore(tmp_path / "s", model="m", ann_threshold=500, ann=ann)
    store.add(ids, vectors, metadata)
    store.remove(ids[:100])
    assert store._index.ntotal == len(ids)  # not deleted from the index: masked
    for q in (100, 150, 700):
        hits = store.search(vectors[q], k=5)[0]
        assert hits[0].id == ids[q] and not set(ids_of(hits)) & set(ids[:100])
    for q in range(5):  # the removed vectors themselves no longer come back
        assert ids[q] not in ids_of(store.search(vectors[q], k=20)[0])
    store.remove(ids[100:300])  # past a fifth dead: rebuilt without them
    assert store._index.ntotal == len(ids) - 300 == len(store)
    assert isinstance(store._index, APPROXIMATE[ann])
    assert store.search(vectors[400], k=1)[0][0].id == ids[400]


@pytest.mark.parametrize("ann", APPROXIMATE)
def test_approximate_with_a_narrow_filter_still_returns_k(tmp_path, data, ann):
    ids, vectors, metadata = data
    store = EmbeddedStore(tmp_path / "s", model="m", ann_threshold=500, ann=ann, ef_search=16, nprobe=1)
    store.add(ids, vectors, metadata)
    for predicate, keep in [("i < 8", lambda i: i < 8), ("even = 'yes'", lambda i: i % 2 == 0),
                            ("i >= 3 and i < 1190", lambda i: 3 <= i < 1190)]:
        hits = store.search(vectors[600], k=8, where=predicate)[0]
        assert len(hits) == 8 and all(keep(h.metadata["i"]) for h in hits)
        if predicate == "i < 8":
            assert sorted(ids_of(hits)) == sorted(ids[:8])


def test_a_killed_writers_temporary_index_file_is_removed_by_the_next_writer(tmp_path, data):
    ids, vectors, metadata = data
    store = EmbeddedStore(tmp_path / "s", model="m")
    store.add(ids[:10], vectors[:10], metadata[:10])
    stale = tmp_path / "s" / f".{INDEX_FILE}.k1ll3d.tmp"  # as atomic_write names it, left by a SIGKILL
    stale.write_bytes(b"half an index")
    store.add(ids[10:20], vectors[10:20], metadata[10:20])
    store.close()  # writes the index file
    assert not stale.exists() and (tmp_path / "s" / INDEX_FILE).exists()
    assert len(EmbeddedStore(tmp_path / "s")._rows) == 20


def test_a_stale_or_broken_index_file_is_reconciled_with_sqlite(tmp_path, data):
    ids, vectors, metadata = data
    path = tmp_path / "s"
    store = EmbeddedStore(path, model="m")
    store.add(ids[:300], vectors[:300], metadata[:300])
    store.close()
    shutil.copy(path / INDEX_FILE, tmp_path / "old.faiss")
    store = EmbeddedStore(path)
    store.add(ids[300:600], vectors[300:600], metadata[300:600])
    store.remove(ids[:10])
    store.close()
    # As if the process had died before writing the index file: the file knows none of the last changes.
    shutil.copy(tmp_path / "old.faiss", path / INDEX_FILE)
    store = EmbeddedStore(path)
    assert len(store) == 590 and store._index.ntotal == 590
    assert store.search(vectors[450], k=1)[0][0].id == ids[450]
    assert ids[3] not in ids_of(store.search(vectors[3], k=10)[0])
    store.close()
    (path / INDEX_FILE).write_bytes(b"garbage")
    store = EmbeddedStore(path)
    assert store._index.ntotal == 590 and store.search(vectors[20], k=1)[0][0].id == ids[20]


def test_two_handles_see_each_others_commits(tmp_path, data):
    ids, vectors, metadata = data
    writer = EmbeddedStore(tmp_path / "s", model="m")
    reader = EmbeddedStore(tmp_path / "s")
    assert reader.dim is None
    writer.add(ids[:50], vectors[:50], metadata[:50])
    assert reader.search(vectors[7], k=1)[0][0].id == ids[7]
    writer.remove([ids[7]])
    writer.add([ids[8]], vectors[9:10], [{"i": 9}])
    assert ids[7] not in ids_of(reader.search(vectors[7], k=5)[0])
    assert reader.search(vectors[9], k=2)[0][1].id in (ids[8], ids[9])
    assert len(reader) == 49
    writer.close()
    reader.close()


def test_every_row_is_in_sqlite_once_with_its_vector(tmp_path, data):
    ids, vectors, metadata = data
    store = EmbeddedStore(tmp_path / "s", model="m")
    store.add(ids[:20], vectors[:20], metadata[:20], hashes=["h"] * 20)
    store.add(ids[:5], vectors[20:25], metadata[:5], hashes=["g"] * 5)
    store.close()
    db = sqlite3.connect(tmp_path / "s" / DB_FILE)
    rows = db.execute("SELECT id, hash, vector FROM rows JOIN vectors USING (row) ORDER BY id").fetchall()
    assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 20
    assert len(rows) == 20 == len({r[0] for r in rows})
    stored = {r[0]: np.frombuffer(r[2], np.float32) for r in rows}
    np.testing.assert_array_equal(stored[ids[0]], vectors[20])
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    model, dim = (db.execute(f"SELECT value FROM meta WHERE key = '{k}'").fetchone()[0] for k in ("model", "dim"))
    assert (model, dim) == ('"m"', "32")


def test_refuses_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(RosettaError, match="not a Rosetta store"):
        EmbeddedStore(tmp_path / "photos", model="m")
    with pytest.raises(RosettaError, match="not a directory"):
        EmbeddedStore(tmp_path / "photos" / "a.jpg", model="m")
    EmbeddedStore(tmp_path / "s", model="m", ann_threshold=10).close()
    with pytest.raises(RosettaError, match="created with ann_threshold=10"):
        EmbeddedStore(tmp_path / "s", ann_threshold=20)


def test_a_broken_database_is_one_line(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RosettaError, match="not a readable store database"):
        EmbeddedStore(tmp_path / "s")


def test_unknown_locations_are_refused(tmp_path):
    from rosetta.store import open_store

    with pytest.raises(RosettaError, match="unknown store location"):
        open_store("s3://bucket/store", model="m")
    with pytest.raises(RosettaError, match="no Milvus index options|take no index options"):
        open_store(str(tmp_path / "x.db"), model="m", ann_threshold=5)
