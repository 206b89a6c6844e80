"""Evaluation results for people (a table) and for tools (JSON laid out as CLIP_benchmark's results files)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rosetta.files import write_json

# Our task names and CLIP_benchmark's, so results files line up with theirs.
CLIP_BENCHMARK_TASKS = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "compositionality": "image_caption_selection",
}


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """An aligned task / metric / value table, one metric a line."""
    rows = [("task", "metric", "value")]
    rows += [(task, metric, _value(value)) for task, metrics in results.items() for metric, value in metrics.items()]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(f"{task:<{widths[0]}}  {metric:<{widths[1]}}  {value}" for task, metric, value in rows)


def write_results(path: str | Path, results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> Path:
    """Write {"dataset", "model", ...meta, "task", "metrics"} per task: one object for one task, else a list.

    `meta` names at least the dataset and the model; its other keys (split, templates...) are kept alongside.
    The file is replaced atomically.
    """
    entries = [
        {"dataset": meta.get("dataset"), "model": meta.get("model"),
         **{k: v for k, v in meta.items() if k not in ("dataset", "model")},
         "task": CLIP_BENCHMARK_TASKS.get(task, task), "metrics": dict(metrics)}
        for task, metrics in results.items()
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, entries[0] if len(entries) == 1 else entries)
    return path
