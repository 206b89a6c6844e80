"""Compositionality: does the image match its caption better than a hard negative that recombines its words
("a red circle and a blue square" against "a blue circle and a red square")? CLIP_benchmark calls this task
image_caption_selection (SugarCrepe and the like)."""

from __future__ import annotations

from collections.abc import Iterable

from rosetta.errors import InputError
from rosetta.eval.retrieval import ImageEmbeddings, embed_texts


def with_negatives(records: Iterable[dict]) -> list[dict]:
    """The records the test can use: an image, a caption and a hard-negative caption."""
    return [
        r for r in records
        if r.get("image") is not None and isinstance(r.get("text"), str) and isinstance(r.get("negative"), str)
        and r["negative"].strip()
    ]


def compositionality(model, records: Iterable[dict], batch_size: int = 64, images: ImageEmbeddings | None = None
                     ) -> dict[str, float]:
    """{"acc": fraction of images closer (cosine) to their caption than to its negative, strictly; "n": images}."""
    rows = with_negatives(records)
    if not rows:
        raise InputError("compositionality: no records with an image, a caption and a hard negative")
    images = ImageEmbeddings(model, batch_size) if images is None else images
    image_vectors, kept = images.of_records("compositionality", rows)
    rows = [rows[i] for i in kept]
    texts = embed_texts(model, [r["text"] for r in rows] + [r["negative"] for r in rows], batch_size)
    caption, negative = texts[: len(rows)], texts[len(rows) :]
    correct = (image_vectors * caption).sum(dim=1) > (image_vectors * negative).sum(dim=1)
    return {"acc": correct.double().mean().item(), "n": len(rows)}
