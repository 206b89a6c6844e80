"""Search latency and recall: the embedded store vs raw FAISS with the same index parameters, one process.

    python benchmarks/search.py [--sizes 100000,1000000] [--queries 500] [--ann ivf|hnsw] [--uniform]

For each size: N random unit vectors of dimension 512 go into an EmbeddedStore (SQLite + FAISS;
exact search below its threshold, then IVF or HNSW as the store grows in 50k adds) and into a bare
FAISS index of the same kind and parameters (IVF: as many k-means lists as the store's, trained the
same way; HNSW: the same M and efConstruction). Both answer the same single-vector queries; prints
build time, p50/p95 latency, recall@10 against exact search, and the store's p50 over raw FAISS's,
for several search breadths (nprobe or efSearch; the store's default first).

The vectors are drawn around 1,000 random centres, as embeddings cluster by content. `--uniform`
draws them uniformly on the sphere instead: there every point is nearly orthogonal to every other
(cosines 0 +- 0.044 in 512-d), no index beats an exhaustive scan, and recall at these settings is low.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import faiss
import numpy as np

from rosetta.models.io import cpu_isa, cpuinfo
from rosetta.store.embedded import EmbeddedStore, IndexParams

DIM = 512


def unit_vectors(rng: np.random.Generator, n: int, centres: np.ndarray | None) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, DIM), dtype=np.float32)
        if centres is not None:
            x = centres[rng.integers(0, len(centres), m)] + x / np.sqrt(DIM)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(search, q: np.ndarray) -> tuple[float, list]:
    start = time.perf_counter()
    found = search(q)
    return (time.perf_counter() - start) * 1000, found


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    defaults = IndexParams()
    parser.add_argument("--ann", choices=("ivf", "hnsw"), default=defaults.ann, help="the approximate index")
    parser.add_argument("--m", type=int, default=defaults.hnsw_m, help="HNSW graph degree")
    parser.add_argument("--ef-construction", type=int, default=defaults.ef_construction)
    parser.add_argument("--breadths", help="comma-separated nprobe (IVF) or efSearch (HNSW) values to measure, "
                        f"the store's default first (default: {defaults.nprobe},8,128 or {defaults.ef_search},96,384)")
    parser.add_argument("--uniform", action="store_true", help="uniform on the sphere (no structure) instead")
    args = parser.parse_args()
    args.breadths = [int(b) for b in (args.breadths or (
        f"{defaults.nprobe},8,128" if args.ann == "ivf" else f"{defaults.ef_search},96,384")).split(",")]

    index = ("IVF, 4 sqrt(N) lists trained on 64 vectors a list" if args.ann == "ivf"
             else f"HNSW M={args.m} efConstruction={args.ef_construction}")
    print(f"cpu: {cpuinfo('model name') or '?'} ({cpu_isa()})")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads to build, 1 to query; "
          f"dim {DIM}, k {args.k}, {index}; {'uniform' if args.uniform else 'clustered'} unit vectors")
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as directory:
            run(n, args, directory)


def raw_index(args: argparse.Namespace, data: np.ndarray, lists: int) -> faiss.Index:
    """What the store builds, made with FAISS alone: the same kind, parameters and training."""
    if args.ann == "hnsw":
        index = faiss.IndexHNSWFlat(DIM, args.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(1).choice(len(data), min(len(data), 64 * lists), replace=False)
        index.train(data[np.sort(sample)])
    index.add(data)
    return index


def run(n: int, args: argparse.Namespace, directory: str) -> None:
    rng = np.random.default_rng(0)
    centres = None if args.uniform else unit_vectors(rng, 1000, None)
    data = unit_vectors(rng, n, centres)
    queries = unit_vectors(rng, args.queries, centres)
    _, truth = faiss.knn(queries, data, args.k, metric=faiss.METRIC_INNER_PRODUCT)

    start = time.perf_counter()
    store = EmbeddedStore(directory, model="benchmark", dim=DIM, ann_threshold=min(50_000, n), ann=args.ann,
                          hnsw_m=args.m, ef_construction=args.ef_construction)
    for first in range(0, n, 50_000):  # as an indexing run grows it: exact, then approximate, then more added
        chunk = data[first : first + 50_000]
        store.add([str(i) for i in range(first, first + len(chunk))], chunk)
    lists = getattr(store._index, "nlist", 0)
    store.close()
    store_build = time.perf_counter() - start

    start = time.perf_counter()
    raw = raw_index(args, data, lists)
    raw_build = time.perf_counter() - start
    del data

    kind = f"IVF with {lists} lists" if args.ann == "ivf" else "HNSW"
    breadth = "nprobe" if args.ann == "ivf" else "efSearch"
    print(f"\nN={n:,}, {kind}: built in {raw_build:.0f} s (raw FAISS, at once), {store_build:.0f} s (EmbeddedStore, "
          "in 50k adds with its rebuilds, SQLite commits and index file included)")
    print(f"  {breadth:>8}  {'':14}{'p50 ms':>9}{'p95 ms':>9}{'recall@10':>11}{'p50 ratio':>11}")
    for b in args.breadths:
        store = EmbeddedStore(directory, **{"nprobe" if args.ann == "ivf" else "ef_search": b})
        params = (faiss.SearchParametersIVF(nprobe=b) if args.ann == "ivf"
                  else faiss.SearchParametersHNSW(efSearch=b))

        def search_raw(q, params=params):
            return raw.search(q[None], args.k, params=params)[1][0].tolist()

        def search_store(q, store=store):
            return [int(h.id) for h in store.search(q, k=args.k)[0]]

        # One query at a time on one FAISS thread (as a server answers requests), alternating the two on
        # every query so that load from other processes hits both alike.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        ms = {"raw FAISS": [], "EmbeddedStore": []}
        found = {"raw FAISS": [], "EmbeddedStore": []}
        for i, q in enumerate(np.concatenate([queries[:20], queries])):
            for name, search in (("raw FAISS", search_raw), ("EmbeddedStore", search_store))[:: 1 if i % 2 else -1]:
                elapsed, result = timed(search, q)
                if i >= 20:  # the first 20 warm up
                    ms[name].append(elapsed)
                    found[name].append(result)
        faiss.omp_set_num_threads(threads)
        store.close()
        ratio = np.percentile(ms["EmbeddedStore"], 50) / np.percentile(ms["raw FAISS"], 50)
        for name in ms:
            print(f"  {b:8}  {name:14}{np.percentile(ms[name], 50):9.3f}{np.percentile(ms[name], 95):9.3f}"
                  f"{recall(found[name], truth):11.3f}" + (f"{ratio:10.2f}x" if name == "EmbeddedStore" else ""))


if __name__ == "__main__":
    main()
