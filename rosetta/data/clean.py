"""Filter image-text pairs as web-scale datasets are filtered (LAION, DataComp), without touching the source.

Each record gets the first check it fails, in this order (cheap checks first):

    no_caption, caption_too_short, caption_too_long   words of the caption
    no_image, unreadable, duplicate                   the file's bytes (sha256 equal to a kept record's)
    corrupt, too_small, aspect_ratio                  the decoded image
    near_duplicate                                    perceptual hash within a Hamming distance of a kept image
    low_similarity                                    image-text cosine under a model (optional, last)

Duplicates are judged against the records kept so far, so the first of a group is kept. The kept
records go to `clean.jsonl` (paths point at the original files); `report.json` holds the counts
per reason and every rejected key with its reason.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rosetta.data.records import Record, write_manifest
from rosetta.errors import InputError, RosettaError
from rosetta.files import write_json
from rosetta.modalities.image import load_image

REASONS = (
    "no_caption", "caption_too_short", "caption_too_long", "no_image", "unreadable", "duplicate",
    "corrupt", "too_small", "aspect_ratio", "near_duplicate", "low_similarity",
)


@dataclass(frozen=True)
class CleanOptions:
    min_size: int = 64  # pixels, shorter side
    max_aspect: float = 3.0  # longer side / shorter side
    min_words: int = 1
    max_words: int = 60
    near_dup_threshold: int = 4  # Hamming distance of 64-bit perceptual hashes; negative turns the check off
    min_similarity: float = 0.2  # image-text cosine, used only with a model

    def __post_init__(self):
        if self.min_size < 1:
            raise RosettaError(f"--min-size {self.min_size}: must be at least 1")
        if self.max_aspect < 1:
            raise RosettaError(f"--max-aspect {self.max_aspect}: must be at least 1 (longer side / shorter side)")
        if not 0 <= self.min_words <= self.max_words:
            raise RosettaError(f"--min-words {self.min_words} --max-words {self.max_words}: need 0 <= min <= max")
        if self.near_dup_threshold > 63:
            raise RosettaError(f"--near-dup-threshold {self.near_dup_threshold}: at most 63 of 64 bits")
        if not -1 <= self.min_similarity <= 1:
            raise RosettaError(f"--min-similarity {self.min_similarity}: a cosine lies in [-1, 1]")


# Perceptual hash (pHash): the signs of the lowest 8x8 DCT frequencies of a 32x32 grey thumbnail,
# relative to their median. Resizing, recompression and small edits flip few of the 64 bits.

_N = 32
_DCT = np.cos(np.pi * np.outer(np.arange(_N), 2 * np.arange(_N) + 1) / (2 * _N))  # DCT-II basis [k, n]


def phash(image: Image.Image) -> int:
    """A 64-bit perceptual hash of `image` (the same as the `imagehash` library's `phash`)."""
    pixels = np.asarray(image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    bits = np.packbits((low > np.median(low)).reshape(-1))
    return int.from_bytes(bits.tobytes(), "big")


class NearDuplicateIndex:
    """Finds a stored 64-bit hash within `threshold` bits of a query without comparing against all of them.

    Multi-index hashing: split the hash into threshold + 1 bands. Two hashes that differ in at most
    `threshold` bits agree exactly on at least one band (pigeonhole), so candidates come from
    exact lookups of each band and only they are compared.
    """

    def __init__(self, threshold: int):
        if not 0 <= threshold <= 63:
            raise ValueError(f"threshold {threshold}: expected 0 to 63 bits")
        self.threshold = threshold
        edges = np.linspace(0, 64, threshold + 2).astype(int)
        self.bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def find(self, value: int) -> tuple[str, int] | None:
        """The key of the closest stored hash within the threshold, and its distance; None if there is none."""
        candidates = {i for (shift, mask), table in zip(self.bands, self.tables)
                      for i in table.get((value >> shift) & mask, ())}
        best = min(((int.bit_count(self.hashes[i] ^ value), i) for i in candidates), default=None)
        if best is None or best[0] > self.threshold:
            return None
        return self.keys[best[1]], best[0]

    def add(self, value: int, key: str) -> None:
        for (shift, mask), table in zip(self.bands, self.tables):
            table.setdefault((value >> shift) & mask, []).append(len(self.hashes))
        self.hashes.append(value)
        self.keys.append(key)


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Cleaner:
    def __init__(self, options: CleanOptions, model, batch_size: int):
        self.options = options
        self.model = model
        self.batch_size = batch_size
        self.sha256: dict[str, str] = {}  # of kept records' files -> their key
        self.near = NearDuplicateIndex(options.near_dup_threshold) if options.near_dup_threshold >= 0 else None
        self.kept: list[Record] = []
        self.rejected: list[dict[str, str]] = []
        self.pending: list[tuple[Record, Image.Image | None]] = []  # images wait here for the similarity check

    def add(self, record: Record) -> None:
        try:
            self.check_caption(record)
            image, digest, perceptual = self.check_image(record)
        except _Rejected as r:
            self.rejected.append({"key": record["key"], "reason": r.reason, "detail": r.detail})
            return
        self.sha256[digest] = record["key"]
        if self.near is not None:
            self.near.add(perceptual, record["key"])
        scored = self.model is not None and "text" in record
        self.pending.append((record, image if scored else None))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def check_caption(self, record: Record) -> None:
        o = self.options
        text = record.get("text")
        if text is None:
            if o.min_words > 0:
                raise _Rejected("no_caption", "no caption")
            return
        words = len(text.split())
        if words < o.min_words:
            raise _Rejected("caption_too_short", f"{words} words < {o.min_words}")
        if words > o.max_words:
            raise _Rejected("caption_too_long", f"{words} words > {o.max_words}")

    def check_image(self, record: Record) -> tuple[Image.Image, str, int]:
        """What a kept record needs: its decoded image, the file's sha256 and the image's pHash."""
        o = self.options
        path = record.get("image")
        if path is None:
            raise _Rejected("no_image", "no image")
        if not isinstance(path, str):
            raise RosettaError("clean reads image files, and this source holds image bytes: clean before sharding")
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise _Rejected("unreadable", f"{path}: {e.strerror or e}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.sha256:
            raise _Rejected("duplicate", f"same bytes as {self.sha256[digest]}")
        try:
            image = load_image(path)
        except InputError as e:
            raise _Rejected("corrupt", str(e)) from None
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short < o.min_size:
            raise _Rejected("too_small", f"{width}x{height}: shorter side < {o.min_size} pixels")
        if long / short > o.max_aspect:
            raise _Rejected("aspect_ratio", f"{width}x{height}: aspect ratio {long / short:.2f} > {o.max_aspect}")
        if self.near is None:
            return image, digest, 0
        perceptual = phash(image)
        match = self.near.find(perceptual)
        if match is not None:
            raise _Rejected("near_duplicate", f"{match[1]} bits from {match[0]}")
        return image, digest, perceptual

    def flush(self) -> None:
        scored = [(record, image) for record, image in self.pending if image is not None]
        similarity = {}
        if scored:
            images = self.model.embed_images([image for _, image in scored], batch_size=self.batch_size)
            texts = self.model.embed_texts([record["text"] for record, _ in scored], batch_size=self.batch_size)
            cosines = (images * texts).sum(dim=-1).tolist()
            similarity = {id(record): cosine for (record, _), cosine in zip(scored, cosines)}
        for record, _ in self.pending:
            cosine = similarity.get(id(record))
            if cosine is not None and cosine < self.options.min_similarity:
                self.rejected.append({"key": record["key"], "reason": "low_similarity",
                                      "detail": f"cosine {cosine:.3f} < {self.options.min_similarity}"})
            else:
                self.kept.append(record)
        self.pending = []


def clean(
    records: Iterable[Record], out: str | os.PathLike, options: CleanOptions = CleanOptions(),
    model=None, batch_size: int = 32,
) -> dict[str, Any]:
    """Filter `records` into `out/clean.jsonl` and `out/report.json`; returns the report.

    With a ContrastiveModel as `model`, pairs whose image-text cosine is below
    `options.min_similarity` are dropped too. Source files are only read.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cleaner = _Cleaner(options, model, batch_size)
    total = 0
    for record in tqdm(records, desc="clean", unit="record", disable=None):
        total += 1
        cleaner.add(record)
    cleaner.flush()
    counts = dict.fromkeys(REASONS, 0)
    for rejection in cleaner.rejected:
        counts[rejection["reason"]] += 1
    report = {
        "total": total,
        "kept": len(cleaner.kept),
        "rejected_count": len(cleaner.rejected),
        "counts": counts,
        "options": asdict(options) | {"similarity_model": model is not None},
        "rejected": cleaner.rejected,
    }
    write_manifest(cleaner.kept, out / "clean.jsonl")
    write_json(out / "report.json", report)
    return report
