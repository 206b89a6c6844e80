"""Stores: where embeddings live for search. One protocol, two backends, opened by location.

    rosetta.Store("photos.store", model="vit-b-32")        # a directory: the embedded store
    rosetta.Store("milvus://host:19530/photos")            # a Milvus collection
    rosetta.Store("test.db")                                # a milvus-lite file (tests, laptops)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rosetta.errors import RosettaError
from rosetta.store.base import Hit, VectorStore, check_model, parse_where


def open_store(location: str | Path, model: str | None = None, dim: int | None = None,
               **options: Any) -> VectorStore:
    """Open (or, given `model`, create) the store at `location`.

    A directory path is the embedded store (FAISS + SQLite; `options` are its index parameters:
    ann_threshold, ann ("ivf" or "hnsw"), nprobe, hnsw_m, ef_construction, ef_search).
    `milvus://host:port/collection` is a Milvus collection, and a path ending in `.db` a milvus-lite
    file (collection "rosetta"). A store remembers the model and dimension that built it and refuses others.
    """
    location = str(location)
    if location.startswith("milvus://") or location.endswith(".db"):
        if options:
            raise RosettaError(f"{location}: Milvus stores take no index options ({', '.join(options)})")
        from rosetta.store.milvus import MilvusStore

        return MilvusStore(location, model=model, dim=dim)
    if "://" in location:
        raise RosettaError(
            f"{location}: unknown store location (a directory, milvus://host:port/collection or a .db file)")
    from rosetta.store.embedded import EmbeddedStore

    return EmbeddedStore(location, model=model, dim=dim, **options)


__all__ = ["Hit", "VectorStore", "check_model", "open_store", "parse_where"]
