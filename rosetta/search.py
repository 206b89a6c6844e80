"""Search: the stored files nearest to a text, an image, a sound or a video, or a text and one of those at once.

    search(model, store, text="a dog on a beach")
    search(model, store, text="in black and white", image="query.jpg", weights=(0.3, 0.7))
    search(model, store, audio="bark.wav")

A composed query is the weighted sum of the normalised text and image (sound, video) embeddings,
renormalised. A sound or a video is stored as one row per window (`rosetta.store.index`); results are
per file, each scored by its best window, whose `start` and `end` seconds its metadata carries.
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

# Rows asked of the store per file wanted: a sound's or video's windows crowd the nearest rows, one file each.
ROWS_PER_HIT = 4


def query_vector(model: Any, text: str | None = None, image: Any = None, weights: Sequence[float] | None = None,
                 *, audio: Any = None, video: Any = None) -> np.ndarray:
    """The L2-normalised query [D]: a text's embedding, an image's (a sound's, a video's), or the weighted sum of
    a text's and one of those, renormalised.

    `weights` are (text, the other), non-negative and not both zero (default: equal); only with both."""
    media = {name: value for name, value in (("image", image), ("audio", audio), ("video", video)) if value is not None}
    if len(media) > 1:
        raise RosettaError(f"search: one image, sound or video per query, not {' and '.join(media)}")
    if text is None and not media:
        raise RosettaError("search: give a text, an image, a sound or a video")
    if weights is not None:
        weights = tuple(float(w) for w in weights)
        if text is None or not media:
            raise RosettaError("search: weights mix a text and an image (sound, video); give both, or no weights")
        if len(weights) != 2 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise RosettaError(f"search: weights {weights}: two non-negative numbers (text, image), not both zero")
    parts = []
    if text is not None:
        parts.append(_row(model.embed_texts([text])))
    for modality, value in media.items():
        embed = {"image": model.embed_images, "audio": model.embed_audio, "video": model.embed_videos}[modality]
        parts.append(_row(embed([value])))
    if len(parts) == 1:
        return parts[0]
    w_text, w_other = weights or (0.5, 0.5)
    mixed = w_text * parts[0] + w_other * parts[1]
    norm = float(np.linalg.norm(mixed))
    if norm < 1e-6:
        raise RosettaError("search: the weighted embeddings cancel out; change the weights")
    return (mixed / norm).astype(np.float32)


def search(model: Any, store: VectorStore, text: str | None = None, image: Any = None,
           weights: Sequence[float] | None = None, k: int = 10, where: str | None = None, *,
           audio: Any = None, video: Any = None) -> list[Hit]:
    """The k stored files nearest to the query, best first, among the rows whose metadata satisfies `where`
    (e.g. "width > 512 and format = 'jpeg'"). A sound or video is found by its best window: its hit has the
    file's id and that window's metadata (`start`, `end`). The store must have been built by this model."""
    name = model_name(model)
    check_model(store, name, model.config.embed_dim)
    if k < 1:
        raise RosettaError(f"search: k must be at least 1, got {k}")
    if where is not None and where.strip():
        parse_where(where)  # a bad predicate fails before the model runs
    query = query_vector(model, text, image, weights, audio=audio, video=video)[None, :]
    rows = k * ROWS_PER_HIT
    while True:
        found = store.search(query, k=rows, where=where, model=name)[0]
        best = best_per_file(found)
        if len(best) >= k or len(found) < rows:  # enough files, or every matching row seen
            return best[:k]
        rows *= 4


def best_per_file(hits: Sequence[Hit]) -> list[Hit]:
    """Hits (best first) reduced to the best of each file: a window's hit becomes its file's (the file's id, the
    window's score and metadata); other rows stay as they are."""
    best: dict[str, Hit] = {}
    for hit in hits:
        file = hit.metadata.get("path", hit.id) if "segment" in hit.metadata else hit.id
        if file not in best:
            best[file] = Hit(file, hit.score, hit.metadata)
    return list(best.values())


def _row(embeddings: Any) -> np.ndarray:
    array = embeddings.detach().float().cpu().numpy() if hasattr(embeddings, "detach") else np.asarray(embeddings)
    row = array.reshape(-1).astype(np.float32)
    return row / max(float(np.linalg.norm(row)), 1e-12)
