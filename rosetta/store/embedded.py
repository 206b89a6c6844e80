"""The embedded store: one directory, no server. SQLite is the truth, FAISS a persisted cache over it.

    DIR/store.sqlite   rows (id, metadata JSON, content hash), their float32 vectors (a table of
                       their own, so that lookups and filters do not wade through them), the store's
                       identity, and a log of removed rows; WAL journal, one transaction per add/remove
    DIR/index.faiss    the vector index as of some committed state, replaced atomically
    DIR/.index.lock    taken by whoever writes index.faiss

Every `add` commits vectors, metadata and hashes together in one SQLite transaction, so a process
killed at any moment leaves the store as of its last commit. The index file may lag behind SQLite
(it is written on close and as the collection grows); opening the store reconciles it with SQLite,
adding the rows it lacks and dropping those removed since, so nothing committed is ever lost.

Rows get an increasing int64 `row` number that is never reused (an update is a delete plus an
insert); the index stores vectors in row order and keeps `rows[position] = row`. Below
`ann_threshold` rows the index is exact (IndexFlatIP); past it, an approximate one: IVF (the
default: IndexIVFFlat with about 4 sqrt(N) k-means lists, retrained when twice as many are due;
`nprobe` lists searched per query) or HNSW (IndexHNSWFlat; `ef_search` candidates per query). Neither
deletes cheaply, so removed positions are masked out of searches until they pass a fifth of the
index and it is rebuilt. Other processes' commits are picked up before each search.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rosetta.errors import RosettaError
from rosetta.files import atomic_write
from rosetta.store.base import Hit, StoreHandle, as_matrix, check_model, check_rows, metadata_json, parse_where, to_sql

FORMAT = 1
DB_FILE = "store.sqlite"
INDEX_FILE = "index.faiss"
INDEX_LOCK_FILE = ".index.lock"
_INDEX_MAGIC = b"RSTAIDX1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    hash TEXT,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (row INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS removed (seq INTEGER PRIMARY KEY AUTOINCREMENT, row INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class IndexParams:
    """How the vector index is built. Recorded when the store is created; `ef_search` and `nprobe` may be changed
    on open."""

    ann_threshold: int = 50_000  # rows from which an approximate index replaces exact search
    ann: str = "ivf"  # "ivf" (k-means lists: builds 1M x 512 in minutes on 2 cores) or "hnsw" (a graph)
    hnsw_m: int = 16  # HNSW: graph degree
    ef_construction: int = 40  # HNSW: candidates explored per insertion
    ef_search: int = 192  # HNSW: candidates explored per query: recall vs latency (see benchmarks/search.py)
    nprobe: int = 32  # IVF: lists searched per query: recall vs latency (see benchmarks/search.py)

    @staticmethod
    def ivf_lists(n: int) -> int:
        """k-means lists for n vectors: 4 sqrt(n) (FAISS's guidance), with 39 training vectors per list."""
        return max(1, min(int(4 * n**0.5), n // 39))


class EmbeddedStore(StoreHandle):
    """A persistent, crash-safe vector store in one directory (see the module docstring)."""

    def __init__(self, path: str | Path, model: str | None = None, dim: int | None = None,
                 ann_threshold: int | None = None, ann: str | None = None, hnsw_m: int | None = None,
                 ef_construction: int | None = None, ef_search: int | None = None, nprobe: int | None = None):
        self.path = Path(path)
        self.location = str(self.path)
        db = self.path / DB_FILE
        if self.path.exists() and not self.path.is_dir():
            raise RosettaError(f"{self.path}: not a directory (a store is a directory)")
        if not db.exists():
            if self.path.exists() and any(self.path.iterdir()):
                raise RosettaError(f"{self.path}: not a Rosetta store (no {DB_FILE}) and not empty")
            if model is None:
                raise RosettaError(f"{self.path}: no store here (give the model that embeds into it to create one)")
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            db, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            built = {"ann_threshold": ann_threshold, "ann": ann, "hnsw_m": hnsw_m, "ef_construction": ef_construction}
            self._open(model, dim, {"ef_search": ef_search, "nprobe": nprobe}, built)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise RosettaError(f"{db}: not a readable store database ({e})") from None
        except BaseException:
            self._conn.close()
            raise

    def _open(self, model: str | None, dim: int | None, search: dict[str, int | None],
              given: dict[str, Any]) -> None:
        """Create the tables and the identity if new, read them, check them, and load the index.

        `given` are the index's build parameters, fixed when the store is created; `search` its search
        parameters, recorded then too but changeable for one handle."""
        if given["ann"] not in (None, "ivf", "hnsw"):
            raise RosettaError(f"ann={given['ann']!r}: the approximate index is 'ivf' or 'hnsw'")
        # 16 KiB pages hold seven 2 KiB vectors (4 KiB pages would hold one, half empty); new databases only.
        self._db.execute("PRAGMA page_size=16384")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Reads through a memory map and a larger page cache: a search looks up k random rows.
        self._db.execute("PRAGMA mmap_size=1099511627776")
        self._db.execute("PRAGMA cache_size=-65536")
        with self._write():
            for statement in _SCHEMA.split(";"):
                self._db.execute(statement)
            defaults = IndexParams()
            initial = {
                "format": FORMAT, "model": model, "dim": dim,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **{k: v if v is not None else getattr(defaults, k) for k, v in (given | search).items()},
            }
            if not self._db.execute("SELECT count(*) FROM meta").fetchone()[0]:  # a new store
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in initial.items()])
        meta = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
        if meta["format"] != FORMAT:
            raise RosettaError(f"{self.path}: store format {meta['format']}, this Rosetta reads format {FORMAT}")
        self.model: str = meta["model"]
        self.dim: int | None = meta["dim"]
        self.created_at: str = meta["created_at"]
        meta.setdefault("ann", "hnsw")  # stores made before IVF was added
        meta.setdefault("nprobe", IndexParams.nprobe)
        self.params = IndexParams(**{k: search.get(k) or meta[k] for k in IndexParams.__dataclass_fields__})
        check_model(self, model, dim)
        for name, value in given.items():
            if value is not None and value != getattr(self.params, name):
                raise RosettaError(f"{self.path}: this store was created with {name}={getattr(self.params, name)}")
        if dim is not None and self.dim is None:
            self._set_dim(dim)
        self._index: faiss.Index | None = None
        self._rows = np.zeros(0, np.int64)  # row number of each index position, ascending
        self._live = np.zeros(0, bool)  # positions not removed (approximate indexes mask them)
        self._dead = 0  # positions removed but still in the index
        self._version = None  # SQLite's data_version when we last synced: it moves when others commit
        self._search_params: dict[int, faiss.SearchParameters] = {}  # by k, reused (no selector in them)
        self._seen_row = 0  # every committed row up to this one is reflected in the index
        self._seen_removed = 0  # removals up to this seq are reflected
        self._checkpointed = 0  # index size at the last write of the index file
        self._changed = False
        if self.dim is not None:
            with self._read():
                self._load()
            self._maintain()

    # Identity and housekeeping.

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RosettaError(f"{self.path}: the store is closed")
        return self._conn

    def _write(self):
        """A write transaction that holds SQLite's write lock from its first statement."""
        return _Transaction(self._db, self._lock)

    def _set_dim(self, dim: int) -> None:
        with self._write():
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'dim' AND value = 'null'", (json.dumps(dim),))
            stored = json.loads(self._db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
        if stored != dim:
            raise RosettaError(f"{self.path}: this store holds vectors of dimension {stored}, not {dim}")
        self.dim = dim

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM rows").fetchone()[0]

    def close(self) -> None:
        """Write the index file if it is behind, and let go of the database."""
        with self._lock:
            if self._conn is None:
                return
            if self._changed:
                self._checkpoint()
            self._conn.close()
            self._conn = None

    # Writes.

    def add(self, ids: list[str], vectors: Any, metadata: list[dict[str, Any]] | None = None,
            hashes: list[str] | None = None, model: str | None = None) -> None:
        check_model(self, model)
        ids = list(ids)
        vectors = as_matrix(vectors, self.dim, "add")
        check_rows(ids, len(vectors), metadata, hashes)
        if not ids:
            return
        if self.dim is None:
            self._set_dim(vectors.shape[1])
        texts = [metadata_json(m) for m in (metadata or [{}] * len(ids))]
        with self._lock:
            with self._write():
                self._sync()
                self._forget(ids)
                first = self._next_row()
                self._db.executemany(
                    "INSERT INTO rows (row, id, hash, metadata) VALUES (?, ?, ?, ?)",
                    [(first + i, id_, "" if hashes is None else hashes[i], texts[i]) for i, id_ in enumerate(ids)],
                )
                self._db.executemany("INSERT INTO vectors (row, vector) VALUES (?, ?)",
                                     [(first + i, vectors[i].tobytes()) for i in range(len(ids))])
                removed = self._last_removed()
            # Committed: mirror it in the index. Nobody wrote between our sync and our commit (we held
            # SQLite's write lock), and no thread of ours can sync before we are done (we hold the lock).
            self._append(np.arange(first, first + len(ids), dtype=np.int64), vectors)
            self._seen_row = first + len(ids) - 1
            self._drop_logged(removed)
            self._maintain()

    def remove(self, ids: list[str]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self._lock:
            with self._write():
                self._sync()
                self._forget(ids)
                self._sync()
            self._maintain()

    def _forget(self, ids: list[str]) -> None:
        """Inside a write transaction: delete rows by id and log their row numbers as removed."""
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            rows = [r for (r,) in self._db.execute(f"SELECT row FROM rows WHERE id IN ({marks})", chunk)]
            if rows:
                self._db.executemany("INSERT INTO removed (row) VALUES (?)", [(r,) for r in rows])
                self._db.execute(f"DELETE FROM rows WHERE id IN ({marks})", chunk)
                self._db.execute(f"DELETE FROM vectors WHERE row IN ({','.join('?' * len(rows))})", rows)

    def _next_row(self) -> int:
        found = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'rows'").fetchone()
        return (found[0] if found else 0) + 1

    def _last_removed(self) -> int:
        found = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'removed'").fetchone()
        return found[0] if found else 0

    # Reads.

    def metadata(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        out = {}
        with self._lock:
            for chunk in _chunks(list(ids), 500):
                marks = ",".join("?" * len(chunk))
                for id_, text in self._db.execute(f"SELECT id, metadata FROM rows WHERE id IN ({marks})", chunk):
                    out[id_] = json.loads(text)
        return out

    def hashes(self, where: str | None = None) -> dict[str, str]:
        sql, params = ("", []) if where is None else to_sql(parse_where(where))
        with self._lock:
            return dict(self._db.execute(f"SELECT id, hash FROM rows {'WHERE ' + sql if sql else ''}", params))

    def search(self, queries: Any, k: int = 10, where: str | None = None,
               model: str | None = None) -> list[list[Hit]]:
        check_model(self, model)
        queries = as_matrix(queries, self.dim, "search")
        if k < 1:
            raise RosettaError(f"search: k must be at least 1, got {k}")
        predicate = None if where is None or not where.strip() else parse_where(where)
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            allowed = None
            if predicate is not None or version != self._version or self._index is None:
                with self._read():  # one snapshot for the sync and the filter
                    self._sync()
                    self._version = version
                    if predicate is not None and self._index is not None:
                        sql, params = to_sql(predicate)
                        allowed = self._positions(np.fromiter((r for (r,) in self._db.execute(
                            f"SELECT row FROM rows WHERE {sql} ORDER BY row", params)), np.int64))
            if self._index is None:
                return [[] for _ in queries]
            scores, positions = self._nearest(queries, k, allowed)
            rows = np.where(positions >= 0, self._rows[positions], -1).tolist()
            found = {}
            for chunk in _chunks(sorted({row for hits in rows for row in hits if row >= 0}), 500):
                marks = ",".join("?" * len(chunk))
                found.update((row, (id_, text)) for row, id_, text in self._db.execute(
                    f"SELECT row, id, metadata FROM rows WHERE row IN ({marks})", chunk))
        # Rows another process removed since our sync are not found: left out.
        return [[Hit(found[row][0], score, _decode(found[row][1])) for row, score in zip(hits, row_scores)
                 if row in found] for hits, row_scores in zip(rows, scores.tolist())]

    def _read(self):
        """One snapshot of the database for a sync and the filter that follows it."""
        return _Transaction(self._db, self._lock, "BEGIN")

    def _nearest(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and index positions [Q, k] (-1 where fewer exist) among the allowed positions (None: all live)."""
        n = len(self._rows)
        if allowed is None and not self._dead:
            candidates, mask = n, None
        else:
            mask = np.zeros(n, bool)
            mask[slice(None) if allowed is None else allowed] = True
            mask &= self._live
            candidates = int(mask.sum())
        k_eff = min(k, candidates)
        if k_eff == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        selector = None if mask is None else _Bitmap(mask)
        if not isinstance(self._index, faiss.IndexFlat) and candidates >= self.params.ann_threshold:
            if selector is None:
                params = self._search_params.get(k_eff) or self._search_params.setdefault(
                    k_eff, self._approximate_params(k_eff))
            else:
                params = self._approximate_params(k_eff, selector.selector)
            scores, positions = self._index.search(queries, k_eff, params=params)
            short = (positions < 0).any(axis=1)
            if short.any():  # a narrow filter can strand the graph or the probed lists: answer exactly
                exact_scores, exact_positions = self._exact(queries[short], k_eff, mask)
                scores[short], positions[short] = exact_scores, exact_positions
            return scores, positions
        return self._exact(queries, k_eff, mask)

    def _approximate_params(self, k: int, selector: faiss.IDSelector | None = None) -> faiss.SearchParameters:
        if isinstance(self._index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(nprobe=self.params.nprobe, sel=selector)
        return faiss.SearchParametersHNSW(efSearch=max(self.params.ef_search, k), sel=selector)

    def _exact(self, queries: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive search over the positions in `mask` (None: all)."""
        if isinstance(self._index, faiss.IndexIVF):  # its vectors are spread over the lists: gather the allowed
            positions = np.arange(self._index.ntotal) if mask is None else np.flatnonzero(mask)
            scores, found = faiss.knn(queries, self._index.reconstruct_batch(positions), k,
                                      metric=faiss.METRIC_INNER_PRODUCT)
            return scores, np.where(found >= 0, positions[found], -1)
        flat = self._index if isinstance(self._index, faiss.IndexFlat) else faiss.downcast_index(self._index.storage)
        params = None if mask is None else faiss.SearchParameters(sel=_Bitmap(mask).selector)
        return flat.search(queries, k, params=params)

    # Keeping the index in step with SQLite.

    def _sync(self) -> None:
        """Bring the index up to date with commits (ours or other processes') it has not seen."""
        if self._index is None:
            if self.dim is None:  # another process may have made the first add
                self.dim = json.loads(self._db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
            if self.dim is not None:
                self._load()
            return
        last_row = self._next_row() - 1
        if last_row > self._seen_row:
            self._append_from_db(self._seen_row, last_row)
        self._drop_logged(self._last_removed())

    def _drop_logged(self, last_removed: int) -> None:
        """Drop the rows logged as removed after the last we saw, up to `last_removed`."""
        if last_removed > self._seen_removed:
            removed = np.fromiter((r for (r,) in self._db.execute(
                "SELECT row FROM removed WHERE seq > ? AND seq <= ?", (self._seen_removed, last_removed))), np.int64)
            self._drop(removed)
            self._seen_removed = last_removed

    def _append_from_db(self, after: int, upto: int) -> None:
        for start in range(after, upto, 20_000):
            rows, vectors = [], []
            for row, blob in self._db.execute(
                    "SELECT row, vector FROM vectors WHERE row > ? AND row <= ? ORDER BY row",
                    (start, min(start + 20_000, upto))):
                rows.append(row)
                vectors.append(blob)
            if rows:
                matrix = np.frombuffer(b"".join(vectors), np.float32).reshape(len(rows), self.dim)
                self._append(np.asarray(rows, np.int64), matrix)
        self._seen_row = upto

    def _append(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            if self._index is None:
                self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(np.ascontiguousarray(vectors, np.float32))
            self._rows = np.concatenate([self._rows, rows])
            self._live = np.concatenate([self._live, np.ones(len(rows), bool)])
            self._changed = True

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """Index positions of the given rows (ascending) that the index holds."""
        positions = np.searchsorted(self._rows, rows)
        positions = positions[positions < len(self._rows)]
        return positions[np.isin(self._rows[positions], rows)]

    def _drop(self, rows: np.ndarray) -> None:
        positions = self._positions(np.sort(rows))
        if not len(positions):
            return
        if isinstance(self._index, faiss.IndexFlat):
            self._index.remove_ids(faiss.IDSelectorBatch(positions.astype(np.int64)))
            self._rows = np.delete(self._rows, positions)
            self._live = np.delete(self._live, positions)
        else:
            self._dead += int(self._live[positions].sum())
            self._live[positions] = False
        self._changed = True

    def _maintain(self) -> None:
        """Switch to an approximate index past the threshold; rebuild it when a fifth is dead or (IVF) when
        twice as many lists are due as it was trained with; write the index file as it grows."""
        with self._lock:
            n, live = len(self._rows), len(self._rows) - self._dead
            is_flat = isinstance(self._index, faiss.IndexFlat)
            outgrown = isinstance(self._index, faiss.IndexIVF) and self._index.nlist * 2 <= IndexParams.ivf_lists(live)
            if (is_flat and live >= self.params.ann_threshold) or (not is_flat and n - live > n / 5) or outgrown:
                self._rebuild()
            elif self._changed and n - self._checkpointed >= max(self.params.ann_threshold, self._checkpointed):
                self._checkpoint()

    def _rebuild(self) -> None:
        """A fresh index of the live vectors (exact below the threshold, approximate past it), written out at once."""
        vectors = np.ascontiguousarray(_vectors(self._index)[self._live])
        index = self._new_index(vectors)
        index.add(vectors)  # in one call: faiss builds a better graph from a whole batch
        self._index, self._rows = index, self._rows[self._live]
        self._live, self._dead = np.ones(len(self._rows), bool), 0
        self._search_params.clear()
        self._checkpoint()

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        """An empty index of the kind `vectors` call for (IVF's lists trained on them)."""
        if len(vectors) < self.params.ann_threshold or not len(vectors):
            return faiss.IndexFlatIP(self.dim)
        if self.params.ann == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.params.ef_construction
            return index
        lists = IndexParams.ivf_lists(len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 64 * lists), replace=False)
        index.train(vectors[np.sort(sample)])
        index.make_direct_map()  # positions -> vectors, for rebuilds and exact answers under narrow filters
        return index

    def _checkpoint(self) -> None:
        """Write the index, its row numbers and the state it reflects to index.faiss, atomically."""
        if self._index is None:
            return
        header = json.dumps({"seen_row": self._seen_row, "n": len(self._rows), "dim": self.dim}).encode()

        def write(f):
            f.write(_INDEX_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(self._rows.astype("<i8").tobytes())
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))

        # Writers of the index file (threads or processes) take turns; whoever holds the turn knows that any
        # temporary index file left beside it belongs to a writer that was killed, and removes it.
        with open(self.path / INDEX_LOCK_FILE, "a+b") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)
            for stale in self.path.glob(f".{INDEX_FILE}.*.tmp"):
                stale.unlink(missing_ok=True)
            atomic_write(self.path / INDEX_FILE, write)
        self._checkpointed = len(self._rows)
        self._changed = False

    def _load(self) -> None:
        """Inside a transaction: read index.faiss (if any and sound) and reconcile it with what SQLite holds."""
        self._index, self._rows, self._seen_row = faiss.IndexFlatIP(self.dim), np.zeros(0, np.int64), 0
        loaded = _read_index_file(self.path / INDEX_FILE, self.dim)
        if loaded is not None:
            self._index, self._rows, self._seen_row = loaded
        self._live, self._dead = np.ones(len(self._rows), bool), 0
        self._checkpointed = len(self._rows)
        live_rows = np.fromiter((r for (r,) in self._db.execute(
            "SELECT row FROM rows WHERE row <= ?", (self._seen_row,))), np.int64)
        self._drop(self._rows[~np.isin(self._rows, live_rows)])
        self._seen_removed = self._last_removed()
        last_row = self._next_row() - 1
        if last_row > self._seen_row:
            self._append_from_db(self._seen_row, last_row)
        self._changed = loaded is None or self._changed


class _Transaction:
    """`with` block around BEGIN ... COMMIT (ROLLBACK on error), holding the store's thread lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock, begin: str = "BEGIN IMMEDIATE"):
        self.db, self.lock, self.begin = db, lock, begin

    def __enter__(self):
        self.lock.acquire()
        self.outer = not self.db.in_transaction  # nested: the outer block commits
        try:
            if self.outer:
                self.db.execute(self.begin)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if self.outer:
                self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


class _Bitmap:
    """A faiss selector over index positions, keeping the bits it points into alive."""

    def __init__(self, mask: np.ndarray):
        self.bits = np.packbits(mask, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(self.bits))


def _vectors(index: faiss.Index) -> np.ndarray:
    """The vectors an index holds, [N, D]: a view of a flat index's (or HNSW's flat storage), IVF's gathered."""
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    if isinstance(index, faiss.IndexIVF):
        return index.reconstruct_n(0, index.ntotal)
    flat = index if isinstance(index, faiss.IndexFlat) else faiss.downcast_index(index.storage)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def _read_index_file(path: Path, dim: int) -> tuple[faiss.Index, np.ndarray, int] | None:
    """The index, its row numbers and the last row it reflects; None if missing or unusable (it is rebuilt)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        try:
            if f.read(len(_INDEX_MAGIC)) != _INDEX_MAGIC:
                return None
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            rows = np.frombuffer(f.read(8 * header["n"]), "<i8").astype(np.int64)
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except (ValueError, KeyError, RuntimeError):
            return None
    if header["dim"] != dim or index.ntotal != len(rows) or index.d != dim:
        return None
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.make_direct_map()
    return index, rows, int(header["seen_row"])


def _decode(metadata: str) -> dict[str, Any]:
    return {} if metadata == "{}" else json.loads(metadata)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = ["EmbeddedStore", "IndexParams"]
