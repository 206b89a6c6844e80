"""Evaluation: zero-shot classification, image-text retrieval and compositionality on records, speech
recognition, and plots of runs.

A record is a flat dict: "image" (a path, bytes or PIL image) or "audio", "text" (its caption, or what is
said), "label" (a class name or None), "negative" (a hard-negative caption, optional); other keys are
metadata and ignored here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rosetta.eval.compositionality import compositionality, with_negatives
from rosetta.eval.plot import plot_run
from rosetta.eval.report import format_table, write_results
from rosetta.eval.retrieval import ImageEmbeddings, captioned, retrieval
from rosetta.eval.zeroshot import labelled, zeroshot

TASKS = ("zeroshot", "retrieval", "compositionality", "asr")
EMBEDDING_TASKS = TASKS[:3]  # "all" of a model that embeds; a model that transcribes has "asr"


def evaluate(
    model, records: Iterable[dict], tasks: Sequence[str] = TASKS, classes: Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None, batch_size: int = 64, images: ImageEmbeddings | None = None,
) -> dict[str, dict[str, float]]:
    """Run each task in `tasks` whose fields the records have ({task: metrics}); the others are left out.

    Each image is embedded once for all tasks. Pass `images` (an ImageEmbeddings with `on_error`) to skip
    images that fail to load instead of raising.
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    records = list(records)
    results: dict[str, dict[str, float]] = {}
    if "asr" in tasks:
        from rosetta.eval.asr import asr, with_speech

        if with_speech(records):
            results["asr"] = asr(model, records, batch_size=min(batch_size, 8),
                                 on_error=getattr(images, "on_error", None))
        tasks = [t for t in tasks if t != "asr"]
        if not tasks:
            return results
    images = ImageEmbeddings(model, batch_size) if images is None else images
    for task in dict.fromkeys(tasks):
        if task == "zeroshot" and labelled(records):
            results[task] = zeroshot(model, records, classes, templates, batch_size, images)
        elif task == "retrieval" and captioned(records):
            results[task] = retrieval(model, records, batch_size, images)
        elif task == "compositionality" and with_negatives(records):
            results[task] = compositionality(model, records, batch_size, images)
    return results


__all__ = [
    "EMBEDDING_TASKS", "TASKS", "ImageEmbeddings", "compositionality", "evaluate", "format_table", "plot_run",
    "retrieval", "write_results", "zeroshot",
]
