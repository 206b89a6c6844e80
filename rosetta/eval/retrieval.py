"""Image-text retrieval recall as CLIP_benchmark measures it, and the embedding of records' images and captions
that every evaluation task shares."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rosetta.errors import InputError

KS = (1, 5, 10)


def image_key(image) -> Hashable:
    """What makes two records' images one image: the same path, the same bytes, or the same object."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fspath(image))
    if isinstance(image, bytes):
        return ("bytes", hashlib.sha1(image).hexdigest())
    return ("object", id(image))


class ImageEmbeddings:
    """Embeds each distinct image (or, with `modality`, sound or video) once, however many records or tasks use it.

    It remembers every image it has embedded, so make one per evaluation: after the weights change, its
    vectors are stale (and an in-memory image is known by its id(), which is reused once it is freed).

    An image that does not load raises its InputError; with `on_error`, the error is handed to it instead
    and the image is left out (the batch it was in is then embedded one image at a time to find it).
    """

    def __init__(self, model, batch_size: int = 64, on_error: Callable[[InputError], None] | None = None,
                 modality: str = "image"):
        self.model = model
        self.batch_size = batch_size
        self.on_error = on_error
        self.modality = modality
        self._vectors: dict[Hashable, torch.Tensor | None] = {}  # None: the image failed to load

    def __call__(self, images: Sequence) -> tuple[torch.Tensor, list[int]]:
        """Embeddings [K, D] (float32, CPU, L2-normalised) of the images that load, and their positions in `images`."""
        keys = [image_key(image) for image in images]
        pending: dict[Hashable, object] = {}
        for key, image in zip(keys, images):
            if key not in self._vectors:
                pending.setdefault(key, image)
        todo = list(pending.items())
        starts = range(0, len(todo), self.batch_size)
        for start in tqdm(starts, desc=self.modality, unit="batch", disable=len(starts) < 2 or None, leave=False):
            batch = todo[start : start + self.batch_size]
            for (key, _), vector in zip(batch, self._embed([image for _, image in batch])):
                self._vectors[key] = vector
        kept = [i for i, key in enumerate(keys) if self._vectors[key] is not None]
        if not kept:
            return torch.empty(0), []
        return torch.stack([self._vectors[keys[i]] for i in kept]), kept

    def of_records(self, task: str, rows: Sequence[dict]) -> tuple[torch.Tensor, list[int]]:
        """Embeddings of the rows' images and the positions of those that load; an error if none does."""
        vectors, kept = self([r["image"] for r in rows])
        if not kept:
            raise InputError(f"{task}: none of the {len(rows)} images could be loaded")
        return vectors, kept

    def _embed(self, batch: list) -> list[torch.Tensor | None]:
        try:
            return list(normalised(self._model_embed(batch)))
        except InputError:
            if self.on_error is None:
                raise
        vectors: list[torch.Tensor | None] = []
        for image in batch:
            try:
                vectors.append(normalised(self._model_embed([image]))[0])
            except InputError as e:
                self.on_error(e)
                vectors.append(None)
        return vectors


    def _model_embed(self, batch: list) -> torch.Tensor:
        if self.modality == "image":  # every embedding model has embed_images; `embed` is the contrastive family's
            return self.model.embed_images(batch, batch_size=len(batch), progress=False)
        return self.model.embed(batch, modality=self.modality, batch_size=len(batch), progress=False)


def embed_texts(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Embeddings [N, D] (float32, CPU, L2-normalised) of `texts`, each distinct string embedded once."""
    distinct = list(dict.fromkeys(texts))
    vectors = normalised(model.embed_texts(distinct, batch_size=batch_size))
    row = {text: i for i, text in enumerate(distinct)}
    return vectors[[row[text] for text in texts]]


def normalised(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.detach().float().cpu(), dim=-1)


def captioned(records: Iterable[dict]) -> list[dict]:
    """The records retrieval can use: an image and a non-empty caption."""
    return [r for r in records if r.get("image") is not None and isinstance(r.get("text"), str) and r["text"].strip()]


def recall_at_k(
    queries: torch.Tensor, candidates: torch.Tensor, positives: Sequence[Iterable[int]], ks: Sequence[int] = KS,
    chunk: int = 1024,
) -> dict[int, float]:
    """Fraction of queries with at least one positive candidate among the k most similar, for each k.

    As CLIP-like papers and CLIP_benchmark count it: a query scores 1 if any of its positives is in the top k.
    Ties count against the model (a positive tied with a negative ranks below it), so a model that maps
    everything to one point scores 0, not whatever the sort order happens to give.
    """
    hits = dict.fromkeys(ks, 0)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ candidates.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        for row, columns in enumerate(positives[start : start + chunk]):
            positive[row, list(columns)] = True
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        negatives_above = ((scores >= best) & ~positive).sum(dim=1)
        for k in ks:
            hits[k] += int((negatives_above < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


def retrieval(model, records: Iterable[dict], batch_size: int = 64, images: ImageEmbeddings | None = None
              ) -> dict[str, float]:
    """Text-to-image ("image_retrieval") and image-to-text ("text_retrieval") recall@1/5/10, CLIP_benchmark's names.

    Records with the same image (path, bytes or object) are one image with several captions; each caption's
    positive is the image it describes. A caption string shared by several images is one query whose positives
    are all of them (identical strings embed identically, so no model could rank one above the other).
    """
    pairs = captioned(records)
    if not pairs:
        raise InputError("retrieval: no records with an image and a caption")
    images = ImageEmbeddings(model, batch_size) if images is None else images
    image_vectors, kept = images.of_records("retrieval", pairs)
    image_ids: dict[Hashable, int] = {}
    text_ids: dict[str, int] = {}
    first_row: list[int] = []  # row in image_vectors of each distinct image
    images_of_text: list[set[int]] = []
    texts_of_image: list[set[int]] = []
    for row, i in enumerate(kept):
        image = image_ids.setdefault(image_key(pairs[i]["image"]), len(image_ids))
        if image == len(first_row):
            first_row.append(row)
            texts_of_image.append(set())
        text = text_ids.setdefault(pairs[i]["text"], len(text_ids))
        if text == len(images_of_text):
            images_of_text.append(set())
        images_of_text[text].add(image)
        texts_of_image[image].add(text)
    image_vectors = image_vectors[first_row]
    text_vectors = embed_texts(model, list(text_ids), batch_size)
    text_to_image = recall_at_k(text_vectors, image_vectors, images_of_text)
    image_to_text = recall_at_k(image_vectors, text_vectors, texts_of_image)
    return {
        **{f"image_retrieval_recall@{k}": v for k, v in text_to_image.items()},
        **{f"text_retrieval_recall@{k}": v for k, v in image_to_text.items()},
    }
