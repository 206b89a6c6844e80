"""Zero-shot classification accuracy: each image against a text classifier built from the class names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from rosetta.errors import InputError
from rosetta.eval.retrieval import ImageEmbeddings, normalised


def labelled(records: Iterable[dict]) -> list[dict]:
    """The records zero-shot classification can use: an image and a label."""
    return [r for r in records if r.get("image") is not None and r.get("label") is not None]


def zeroshot(
    model, records: Iterable[dict], classes: Sequence[str] | None = None, templates: str | Sequence[str] | None = None,
    batch_size: int = 64, images: ImageEmbeddings | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy and mean per-class recall, as CLIP_benchmark reports them.

    `classes` defaults to the sorted distinct labels; with fewer than 5 classes, acc5 is top-(number of classes)
    accuracy (CLIP_benchmark reports NaN there). Mean per-class recall averages over the classes that occur
    among the labels. Ties count against the model: an image is right at k if fewer than k other classes score
    at least as high as its own.
    """
    rows = labelled(records)
    if not rows:
        raise InputError("zeroshot: no records with an image and a label")
    labels = [str(r["label"]) for r in rows]
    classes = sorted(set(labels)) if classes is None else [str(c) for c in classes]
    index = {name: i for i, name in enumerate(classes)}
    if len(index) != len(classes):
        raise InputError("zeroshot: the class names repeat")
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(f"zeroshot: label {unknown[0]!r}{more} is not one of the {len(classes)} classes")
    images = ImageEmbeddings(model, batch_size) if images is None else images
    image_vectors, kept = images.of_records("zeroshot", rows)
    target = torch.tensor([index[labels[i]] for i in kept])
    scores = image_vectors @ normalised(model.classifier(classes, templates)).T
    own = scores.gather(1, target[:, None])
    others_at_least = (scores >= own).sum(dim=1) - 1
    top1 = (others_at_least < 1).double()
    per_class = torch.stack([top1[target == c].mean() for c in target.unique()])
    return {
        "acc1": top1.mean().item(),
        "acc5": (others_at_least < min(5, len(classes))).double().mean().item(),
        "mean_per_class_recall": per_class.mean().item(),
    }
