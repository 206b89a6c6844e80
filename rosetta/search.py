"""Search: the stored items nearest to a text, an image, or both at once.

    search(model, store, text="a dog on a beach")
    search(model, store, text="in black and white", image="query.jpg", weights=(0.3, 0.7))

A composed query is the weighted sum of the normalised text and image embeddings, renormalised.
Shared by `rosetta search` and the HTTP server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rosetta.errors import RosettaError
from rosetta.store.base import Hit, VectorStore, check_model, parse_where
from rosetta.store.index import model_name


def query_vector(model: Any, text: str | None = None, image: Any = None,
                 weights: Sequence[float] | None = None) -> np.ndarray:
    """The L2-normalised query [D]: a text's embedding, an image's, or their weighted sum renormalised.

    `weights` are (text, image), non-negative and not both zero (default: equal); only with both."""
    if text is None and image is None:
        raise RosettaError("search: give a text, an image, or both")
    if weights is not None:
        weights = tuple(float(w) for w in weights)
        if text is None or image is None:
            raise RosettaError("search: weights mix a text and an image; give both, or no weights")
        if len(weights) != 2 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise RosettaError(f"search: weights {weights}: two non-negative numbers (text, image), not both zero")
    parts = []
    if text is not None:
        parts.append(_row(model.embed_texts([text])))
    if image is not None:
        parts.append(_row(model.embed_images([image])))
    if len(parts) == 1:
        return parts[0]
    w_text, w_image = weights or (0.5, 0.5)
    mixed = w_text * parts[0] + w_image * parts[1]
    norm = float(np.linalg.norm(mixed))
    if norm < 1e-6:
        raise RosettaError("search: the weighted text and image embeddings cancel out; change the weights")
    return (mixed / norm).astype(np.float32)


def search(model: Any, store: VectorStore, text: str | None = None, image: Any = None,
           weights: Sequence[float] | None = None, k: int = 10, where: str | None = None) -> list[Hit]:
    """The k stored items nearest to the query, best first, among those whose metadata satisfies `where`
    (e.g. "width > 512 and format = 'jpeg'"). The store must have been built by this model."""
    name = model_name(model)
    check_model(store, name, model.config.embed_dim)
    if k < 1:
        raise RosettaError(f"search: k must be at least 1, got {k}")
    if where is not None and where.strip():
        parse_where(where)  # a bad predicate fails before the model runs
    query = query_vector(model, text, image, weights)
    return store.search(query[None, :], k=k, where=where, model=name)[0]


def _row(embeddings: Any) -> np.ndarray:
    array = embeddings.detach().float().cpu().numpy() if hasattr(embeddings, "detach") else np.asarray(embeddings)
    row = array.reshape(-1).astype(np.float32)
    return row / max(float(np.linalg.norm(row)), 1e-12)
