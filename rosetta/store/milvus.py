"""The distributed store: a Milvus collection, through pymilvus' MilvusClient.

    milvus://host:19530/photos   a collection on a Milvus server or cluster
    path/to/file.db              milvus-lite (same client API, one local file; collection "rosetta")

One collection per store: `id` (primary key), `vector` (FLOAT_VECTOR, inner product, AUTOINDEX),
`hash` (content hash) and `metadata` (JSON). The model and dimension that built the store are
collection properties (`rosetta.model`, `rosetta.dim`). `where` predicates become Milvus boolean
expressions over the JSON field, e.g. `metadata["width"] > 512`; values are literals we write
ourselves from the parsed predicate (numbers re-printed, strings escaped), never the user's text.

Each `add` is one upsert per 1,000 rows: Milvus applies a request as a whole, but it has no
transactions across requests.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import rosetta.store.base as base
from rosetta.errors import RosettaError

DEFAULT_COLLECTION = "rosetta"
MAX_ID_LENGTH = 65_535
MAX_K = 16_384  # Milvus' limit on results per query
_UPSERT_ROWS = 1_000


class MilvusStore(base.StoreHandle):
    """A Milvus collection as a Rosetta store (see the module docstring)."""

    def __init__(self, location: str, model: str | None = None, dim: int | None = None):
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise RosettaError(f"{location}: Milvus stores need pymilvus (pip install 'rosetta[milvus]')") from None
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # failures reach the user as RosettaError
        self.location = location
        uri, self.collection = _parse_location(location)
        self._client = _call(location, "connect", lambda: MilvusClient(uri))
        if _call(location, "has_collection", lambda: self._client.has_collection(self.collection)):
            properties = self._describe().get("properties", {})
            if "rosetta.model" not in properties:
                raise RosettaError(f"{location}: collection {self.collection!r} was not made by Rosetta")
            self.model: str = properties["rosetta.model"]
            self.dim: int | None = int(properties["rosetta.dim"])
            self.created_at = properties.get("rosetta.created_at")
            base.check_model(self, model, dim)
        elif model is None:
            raise RosettaError(f"{location}: no store here (give the model that embeds into it to create one)")
        else:
            self.model, self.dim, self.created_at = model, None, None
            if dim is not None:
                self._create(dim)

    def _describe(self) -> dict[str, Any]:
        return _call(self.location, "describe_collection", lambda: self._client.describe_collection(self.collection))

    def _create(self, dim: int) -> None:
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("hash", DataType.VARCHAR, max_length=128)
        schema.add_field("metadata", DataType.JSON)
        index = self._client.prepare_index_params()
        index.add_index("vector", index_type="AUTOINDEX", metric_type="IP")
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        properties = {"rosetta.model": self.model, "rosetta.dim": str(dim), "rosetta.created_at": created_at}
        _call(self.location, "create_collection", lambda: self._client.create_collection(
            self.collection, schema=schema, index_params=index, consistency_level="Strong", properties=properties))
        self.dim, self.created_at = dim, created_at

    def __len__(self) -> int:
        if self.dim is None:
            return 0
        result = _call(self.location, "count", lambda: self._client.query(
            self.collection, filter="", output_fields=["count(*)"]))
        return int(result[0]["count(*)"])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def add(self, ids: list[str], vectors: Any, metadata: list[dict[str, Any]] | None = None,
            hashes: list[str] | None = None, model: str | None = None) -> None:
        base.check_model(self, model)
        ids = list(ids)
        vectors = base.as_matrix(vectors, self.dim, "add")
        base.check_rows(ids, len(vectors), metadata, hashes)
        if not ids:
            return
        if any(len(i.encode()) > MAX_ID_LENGTH for i in ids):
            raise RosettaError(f"add: ids longer than {MAX_ID_LENGTH} bytes do not fit a Milvus primary key")
        if self.dim is None:
            self._create(vectors.shape[1])
        metadata = metadata or [{}] * len(ids)
        rows = [{"id": id_, "vector": vectors[i].tolist(), "hash": "" if hashes is None else hashes[i],
                 "metadata": json.loads(base.metadata_json(metadata[i]))} for i, id_ in enumerate(ids)]
        for start in range(0, len(rows), _UPSERT_ROWS):
            chunk = rows[start : start + _UPSERT_ROWS]
            _call(self.location, "upsert", lambda chunk=chunk: self._client.upsert(self.collection, chunk))

    def remove(self, ids: list[str]) -> None:
        ids = list(ids)
        if not ids or self.dim is None:
            return
        for start in range(0, len(ids), _UPSERT_ROWS):
            chunk = ids[start : start + _UPSERT_ROWS]
            _call(self.location, "delete", lambda chunk=chunk: self._client.delete(self.collection, ids=chunk))

    def metadata(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        ids = list(ids)
        if not ids or self.dim is None:
            return {}
        out = {}
        for start in range(0, len(ids), _UPSERT_ROWS):
            chunk = ids[start : start + _UPSERT_ROWS]
            for row in _call(self.location, "get", lambda chunk=chunk: self._client.get(
                    self.collection, ids=chunk, output_fields=["metadata"])):
                out[row["id"]] = row["metadata"]
        return out

    def hashes(self, where: str | None = None) -> dict[str, str]:
        if self.dim is None:
            return {}
        expression = "" if where is None or not where.strip() else to_milvus(base.parse_where(where))
        iterator = _call(self.location, "query", lambda: self._client.query_iterator(
            self.collection, batch_size=4096, filter=expression, output_fields=["hash"]))
        out = {}
        while batch := _call(self.location, "query", iterator.next):
            out.update((row["id"], row["hash"]) for row in batch)
        iterator.close()
        return out

    def search(self, queries: Any, k: int = 10, where: str | None = None,
               model: str | None = None) -> list[list[base.Hit]]:
        base.check_model(self, model)
        queries = base.as_matrix(queries, self.dim, "search")
        if not 1 <= k <= MAX_K:
            raise RosettaError(f"search: k must be between 1 and {MAX_K}, got {k}")
        expression = "" if where is None or not where.strip() else to_milvus(base.parse_where(where))
        if self.dim is None or not len(queries):
            return [[] for _ in queries]
        results = _call(self.location, "search", lambda: self._client.search(
            self.collection, data=queries.tolist(), limit=k, filter=expression, output_fields=["metadata"],
            search_params={"metric_type": "IP"}))
        return [[base.Hit(hit["id"], float(hit["distance"]), hit["entity"]["metadata"]) for hit in hits]
                for hits in results]


def to_milvus(predicate: base.Predicate) -> str:
    """A Milvus boolean expression over the JSON field `metadata`."""
    if isinstance(predicate, base.Bool):
        return f" {predicate.op} ".join(f"({to_milvus(item)})" for item in predicate.items)
    assert isinstance(predicate, base.Compare)
    op = "==" if predicate.op == "=" else predicate.op
    return f'metadata["{predicate.key}"] {op} {_literal(predicate.value)}'


def _literal(value: float | int | str) -> str:
    if isinstance(value, str):
        if any(ord(c) < 32 and c not in "\n\t\r" for c in value):
            raise RosettaError(f"where: control characters in {value!r} are not supported by Milvus")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'
    if isinstance(value, float) and not math.isfinite(value):
        raise RosettaError(f"where: {value} is not a comparable number")
    return repr(value)


def _parse_location(location: str) -> tuple[str, str]:
    if location.startswith("milvus://"):
        url = urlparse(location)
        if not url.hostname:
            raise RosettaError(f"{location}: expected milvus://host:port/collection")
        collection = url.path.strip("/") or DEFAULT_COLLECTION
        if "/" in collection or not collection.replace("_", "a").isalnum():
            raise RosettaError(f"{location}: a collection name has letters, digits and underscores only")
        return f"http://{url.hostname}:{url.port or 19530}", collection
    path = Path(location)
    if not path.parent.is_dir():
        raise RosettaError(f"{location}: no such directory {path.parent}")
    return str(path.resolve()), DEFAULT_COLLECTION


def _call(location: str, what: str, call):
    """Run a pymilvus call, turning its failures into one-line RosettaErrors."""
    from pymilvus.exceptions import MilvusException

    try:
        return call()
    except MilvusException as e:
        raise RosettaError(f"{location}: Milvus {what} failed: {getattr(e, 'message', None) or e}") from None
