"""An LRU cache of embeddings keyed by (content hash, model name): a repeated input costs no model call."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

CacheKey = tuple[str, str]


def content_key(modality: str, content: bytes | str, model_name: str) -> CacheKey:
    """(sha256 of the modality and the content, model name); the modality keeps a text and same-bytes file apart."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    digest = hashlib.sha256(modality.encode() + b"\0" + data).hexdigest()
    return digest, model_name


class EmbeddingCache:
    """A thread-safe LRU map from `content_key` to one embedding vector; `max_entries=0` disables it."""

    def __init__(self, max_entries: int = 10_000):
        if max_entries < 0:
            raise ValueError("cache size must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> np.ndarray | None:
        with self._lock:
            vector = self._entries.get(key)
            if vector is not None:
                self._entries.move_to_end(key)
            return vector

    def put(self, key: CacheKey, vector: np.ndarray) -> None:
        if self.max_entries == 0:
            return
        vector = np.array(vector, dtype=np.float32, copy=True)
        vector.setflags(write=False)  # shared between requests: nobody may change it in place
        with self._lock:
            self._entries[key] = vector
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
