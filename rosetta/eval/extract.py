"""Field-level extraction accuracy: each document's fields read by a model (local, hosted or OCR) against its
ground truth, exact after normalising numbers (to cents), dates (to ISO) and text (case and spacing); with
the latency of a document, p50 and p95."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rosetta.errors import InputError


def normalised(value: Any, spec: Mapping[str, Any]) -> Any:
    from rosetta.vlm.ocr import AMOUNT, parse_date

    if value is None:
        return None
    if spec.get("type") in ("number", "integer"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return round(float(value), 2)
        amounts = AMOUNT.findall(str(value))
        return round(float("".join(c for c in amounts[-1] if c.isdigit() or c in ".-")), 2) if amounts else None
    if spec.get("format") == "date":
        return parse_date(str(value)) or str(value).strip()
    return " ".join(str(value).casefold().split())


def extraction(model, records: Iterable[dict], schema: Mapping[str, Any],
               on_error: Callable[[Exception], None] | None = None) -> dict[str, float]:
    """Accuracy of every field of the schema over the records with an image and its `fields`."""
    rows = [r for r in records if r.get("image") is not None and isinstance(r.get("fields"), Mapping)]
    if not rows:
        raise InputError("extract: no records with an image and its fields")
    properties = schema.get("properties") or {}
    right = {name: 0 for name in properties}
    whole, seconds, done = 0, [], 0
    for record in rows:
        start = time.perf_counter()
        try:
            got = model.extract(record["image"], schema)
        except InputError as e:
            if on_error is None:
                raise
            on_error(e)
            got = {}
        seconds.append(time.perf_counter() - start)
        done += 1
        hits = [normalised(got.get(name), spec) == normalised(record["fields"].get(name), spec)
                for name, spec in properties.items()]
        for name, hit in zip(properties, hits):
            right[name] += hit
        whole += all(hits)
    quantiles = statistics.quantiles(seconds, n=20) if len(seconds) > 1 else seconds * 19
    return {
        "field_accuracy": sum(right.values()) / (len(properties) * done),
        "document_accuracy": whole / done,
        **{f"{name}_accuracy": count / done for name, count in right.items()},
        "latency_p50_s": statistics.median(seconds),
        "latency_p95_s": quantiles[18],
        "n": done,
    }
