"""The store protocol: where embeddings live for search. Every backend speaks it.

Also the `where` predicate language both backends understand, parsed here once and translated by
each backend (to parameterised SQLite, to a Milvus boolean expression):

    width > 512 and (format = 'jpeg' or format = "png") and label != 'cat'

comparisons (=, ==, !=, <, <=, >, >=) of a metadata key with a number or a quoted string, joined
with `and` / `or` (and binds tighter), with parentheses. A row without the key never matches.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rosetta.errors import RosettaError


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity (vectors are L2-normalised)
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class VectorStore(Protocol):
    """A persistent collection of (id, L2-normalised vector, metadata, content hash) built by one model.

    `model` and `dim` are fixed when the store is created (`dim` may stay None until the first add);
    opening it, adding to it or querying it with another model or dimension raises `RosettaError`.
    """

    location: str
    model: str
    dim: int | None

    def add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any]] | None = None,
            hashes: list[str] | None = None, model: str | None = None) -> None:
        """Insert or replace rows (an id already present is overwritten), all of them in one transaction.

        `hashes` are content hashes (sha256 of the source bytes) that incremental indexing compares;
        `model`, when given, must be the store's model."""

    def remove(self, ids: list[str]) -> None:
        """Delete rows; ids not present are ignored."""

    def search(self, queries: np.ndarray, k: int = 10, where: str | None = None,
               model: str | None = None) -> list[list[Hit]]:
        """The k nearest rows to each query vector [Q, D] (or [D]), best first, among the rows whose metadata
        satisfies `where`, such as "width > 512 and format = 'jpeg'". Fewer than k only when fewer match."""

    def metadata(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Stored metadata of the ids that exist."""

    def hashes(self, where: str | None = None) -> dict[str, str]:
        """Content hash of every row (that satisfies `where`), by id."""

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class StoreHandle:
    """What every backend's handle does alike: a repr naming its location, model and dimension, and `with`
    blocks that close it."""

    location: str
    model: str
    dim: int | None

    def close(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, model={self.model!r}, dim={self.dim})"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_FINGERPRINTED = re.compile(r"^(.*)@([0-9a-f]{32})$")  # 8 big-endian int16s


def split_model(recorded: str) -> tuple[str, np.ndarray | None]:
    """A recorded model name (`NAME@FINGERPRINT`, see `rosetta.store.index.model_name`, or a bare NAME as
    stores made before fingerprints and users typing names hold) as its name and its unit sketch, or None."""
    found = _FINGERPRINTED.match(recorded)
    if found is None:
        return recorded, None
    sketch = np.frombuffer(bytes.fromhex(found.group(2)), ">i2").astype(np.float64)
    return found.group(1), sketch / (np.linalg.norm(sketch) or 1.0)


def same_model(a: str, b: str) -> bool:
    """Whether two recorded model names are one model: by the cosine of their weight sketches when both
    have one (see `rosetta.store.index.weights_fingerprint`), else by name."""
    (name_a, sketch_a), (name_b, sketch_b) = split_model(a), split_model(b)
    if sketch_a is None or sketch_b is None or len(sketch_a) != len(sketch_b):
        return name_a == name_b
    return float(sketch_a @ sketch_b) >= 0.9999


def check_model(store: VectorStore, model: str | None, dim: int | None = None) -> None:
    """Refuse a model or dimension other than the ones that built `store`."""
    if model is not None and not same_model(store.model, model):
        raise RosettaError(
            f"{store.location}: this store was built with model {store.model!r}, not {model!r} "
            "(embeddings of different models are not comparable; use the same model or another store)"
        )
    if dim is not None and store.dim is not None and store.dim != dim:
        raise RosettaError(f"{store.location}: this store holds vectors of dimension {store.dim}, not {dim}")


def as_matrix(vectors: Any, dim: int | None, what: str) -> np.ndarray:
    """Vectors as a C-contiguous float32 [N, D] array, checked against the store's dimension."""
    array = np.asarray(vectors.detach().cpu() if hasattr(vectors, "detach") else vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise RosettaError(f"{what}: expected vectors [N, D], got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise RosettaError(f"{what}: vectors of dimension {array.shape[1]}, but the store holds dimension {dim}")
    if not np.isfinite(array).all():
        raise RosettaError(f"{what}: NaN or infinite values in the vectors")
    return np.ascontiguousarray(array)


def check_rows(ids: list[str], n: int, metadata: list | None, hashes: list | None) -> None:
    if len(ids) != n:
        raise RosettaError(f"add: {len(ids)} ids for {n} vectors")
    if len(set(ids)) != len(ids):
        raise RosettaError("add: the same id appears twice in one call")
    if any(not isinstance(i, str) or not i for i in ids):
        raise RosettaError("add: ids must be non-empty strings")
    for name, values in (("metadata", metadata), ("hashes", hashes)):
        if values is not None and len(values) != n:
            raise RosettaError(f"add: {len(values)} {name} entries for {n} vectors")


def metadata_json(metadata: dict[str, Any]) -> str:
    """One row's metadata as JSON text (numpy scalars and paths become plain values)."""
    if not isinstance(metadata, dict):
        raise RosettaError(f"add: metadata must be a dict per row, got {type(metadata).__name__}")
    try:
        return json.dumps(metadata, ensure_ascii=False, allow_nan=False, default=_plain)
    except ValueError as e:
        raise RosettaError(f"add: metadata is not JSON ({e})") from None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"{type(value).__name__} values cannot be stored")


# The `where` language.

@dataclass(frozen=True)
class Compare:
    key: str
    op: str  # one of = != < <= > >=
    value: float | int | str


@dataclass(frozen=True)
class Bool:
    op: str  # "and" or "or"
    items: tuple[Predicate, ...]


Predicate = Compare | Bool

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z_0-9.])
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|<=|>=|=|<|>)
      | (?P<paren>[()])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_OPS = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def parse_where(text: str) -> Predicate:
    """Parse a `where` predicate, or raise a one-line RosettaError saying what is wrong and where."""
    tokens = _tokenize(text)
    parser = _Parser(text, tokens)
    predicate = parser.expression()
    if parser.pos < len(tokens):
        parser.error("expected 'and', 'or' or the end")
    return predicate


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            start = len(text) - len(text[pos:].lstrip())
            raise RosettaError(f"where {text!r}: unexpected character {text[start]!r} at position {start + 1}")
        kind = match.lastgroup
        raw = match.group(kind)
        start = match.start(kind)
        if kind == "num":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "str":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.DOTALL)
        elif kind == "op":
            value = _OPS[raw]
        elif kind == "word" and raw.lower() in ("and", "or"):
            kind, value = "bool", raw.lower()
        else:
            value = raw
        tokens.append((kind, value, start))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, Any, int]]):
        self.text, self.tokens, self.pos = text, tokens, 0

    def error(self, expected: str) -> None:
        if self.pos < len(self.tokens):
            _, _, start = self.tokens[self.pos]
            raise RosettaError(f"where {self.text!r}: {expected} at position {start + 1}")
        raise RosettaError(f"where {self.text!r}: {expected}, but the predicate ends there")

    def peek(self) -> tuple[str, Any]:
        return self.tokens[self.pos][:2] if self.pos < len(self.tokens) else ("end", None)

    def expression(self) -> Predicate:
        return self._joined("or", self._conjunction)

    def _conjunction(self) -> Predicate:
        return self._joined("and", self._atom)

    def _joined(self, op: str, item) -> Predicate:
        items = [item()]
        while self.peek() == ("bool", op):
            self.pos += 1
            items.append(item())
        return items[0] if len(items) == 1 else Bool(op, tuple(items))

    def _atom(self) -> Predicate:
        kind, value = self.peek()
        if (kind, value) == ("paren", "("):
            self.pos += 1
            inner = self.expression()
            if self.peek() != ("paren", ")"):
                self.error("expected ')'")
            self.pos += 1
            return inner
        if kind != "word":
            self.error("expected a metadata key such as width")
        self.pos += 1
        op_kind, op = self.peek()
        if op_kind != "op":
            self.error(f"expected a comparison (=, !=, <, <=, >, >=) after {value!r}")
        self.pos += 1
        literal_kind, literal = self.peek()
        if literal_kind not in ("num", "str"):
            self.error("expected a number or a quoted string")
        self.pos += 1
        return Compare(value, op, literal)


def to_sql(predicate: Predicate, column: str = "metadata") -> tuple[str, list[Any]]:
    """A parameterised SQLite condition over a JSON column: keys and values travel as parameters.

    `column` is a name chosen by the caller, never user input."""
    if isinstance(predicate, Compare):
        # Compare like with like, as Milvus does: a number never matches a string, nor true/false.
        path = f'$."{predicate.key}"'
        types = "= 'text'" if isinstance(predicate.value, str) else "IN ('integer', 'real')"
        sql = f"json_type({column}, ?) {types} AND json_extract({column}, ?) {predicate.op} ?"
        return sql, [path, path, predicate.value]
    parts, params = [], []
    for item in predicate.items:
        sql, p = to_sql(item, column)
        parts.append(f"({sql})")
        params += p
    return f" {predicate.op.upper()} ".join(parts), params


def matches(predicate: Predicate, metadata: dict[str, Any]) -> bool:
    """Evaluate a predicate on one row's metadata in Python (what the SQL and Milvus translations compute)."""
    if isinstance(predicate, Bool):
        results = (matches(item, metadata) for item in predicate.items)
        return all(results) if predicate.op == "and" else any(results)
    value = metadata.get(predicate.key)
    if value is None or isinstance(value, bool) or isinstance(value, str) != isinstance(predicate.value, str):
        return False
    if not isinstance(value, (int, float, str)):
        return False
    a, b = value, predicate.value
    return {"=": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[predicate.op]
