"""Bound towers (ImageBind's recipe), evaluated: retrieval between the modalities each pairing trained together,
and between modalities that never met in training — emergent alignment through a shared anchor (audio to image
when only audio-text and image-text pairs were seen).

Records are flat dicts with any of "image", "text", "audio", "video"; "label" (a class name) and "motion" say
what a record shows, so that a caption saying the same thing in other words ("a red circle moves left", "a red
circle moving to the left") counts as a match, and an emergent query (a spoken caption) finds the images of its
class.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import torch

from rosetta.data.records import holds
from rosetta.eval.retrieval import ImageEmbeddings, embed_texts, image_key, recall_at_k
from rosetta.train.config import Pairing

KS = (1, 5)
MODALITIES = ("image", "text", "audio", "video")


def binding(model, records: Iterable[dict], pairings: Sequence[Pairing], batch_size: int = 32) -> dict[str, float]:
    """{metric: value}: `{m}_to_{a}_recall@k` both ways for each trained pairing m-a, and for modality pairs
    never trained together, `{m}_to_{n}_top1`: how often the nearest of the other modality has the query's
    label (a class-level hit, since no record pairs them)."""
    records = list(records)
    embed = _Embedder(model, batch_size)  # each file once, however many pairs it is scored in
    done = {frozenset((p.modality, p.anchor)) for p in pairings} | {frozenset(("image", "text"))}
    results: dict[str, float] = {}
    for p in pairings:
        rows = [r for r in records if holds(r, p.modality) and holds(r, p.anchor)]
        if rows:
            results.update(paired_recall(embed, rows, p.modality, p.anchor))
    for modality in dict.fromkeys(p.modality for p in pairings):
        for other in MODALITIES:
            pair = frozenset((modality, other))
            if other == modality or pair in done:
                continue
            done.add(pair)
            queries = [r for r in records if holds(r, modality) and r.get("label")]
            candidates = [r for r in records if holds(r, other) and r.get("label")]
            if queries and candidates:
                results.update(emergent(embed, queries, candidates, modality, other))
    return results


def paired_recall(embed: Callable[[list, str], torch.Tensor], rows: list[dict], modality: str, anchor: str
                  ) -> dict[str, float]:
    """Recall@k from `modality` to `anchor` and back over records holding both. Equal anchors (one caption
    string, one image) are one candidate; its positives are the records holding it and those meaning the same."""
    candidates: dict[Hashable, int] = {}
    sources: list = []
    for r in rows:
        key = _key(r[anchor], anchor)
        if key not in candidates:
            candidates[key] = len(sources)
            sources.append(r[anchor])
    meanings: dict[Hashable, set[int]] = {}
    for r in rows:
        if _meaning(r) is not None:
            meanings.setdefault(_meaning(r), set()).add(candidates[_key(r[anchor], anchor)])
    positives = [{candidates[_key(r[anchor], anchor)]} | meanings.get(_meaning(r), set()) for r in rows]
    queries = embed([r[modality] for r in rows], modality)
    targets = embed(sources, anchor)
    forward = recall_at_k(queries, targets, positives, KS)
    holders: list[set[int]] = [set() for _ in sources]
    for row, ids in enumerate(positives):
        for j in ids:
            holders[j].add(row)
    backward = recall_at_k(targets, queries, holders, KS)
    return {**{f"{modality}_to_{anchor}_recall@{k}": v for k, v in forward.items()},
            **{f"{anchor}_to_{modality}_recall@{k}": v for k, v in backward.items()},
            f"{modality}_{anchor}_n": float(len(rows))}


def emergent(embed: Callable[[list, str], torch.Tensor], queries: list[dict], candidates: list[dict], modality: str,
             other: str) -> dict[str, float]:
    """Class-level top-1 both ways between two modalities never paired: is the nearest one of the query's label?"""
    a = embed([r[modality] for r in queries], modality)
    b = embed([r[other] for r in candidates], other)
    similarity = a @ b.T
    a_labels = [r["label"] for r in queries]
    b_labels = [r["label"] for r in candidates]
    forward = sum(a_labels[i] == b_labels[j] for i, j in enumerate(similarity.argmax(dim=1).tolist()))
    backward = sum(b_labels[j] == a_labels[i] for j, i in enumerate(similarity.argmax(dim=0).tolist()))
    return {f"{modality}_to_{other}_top1": forward / len(queries),
            f"{other}_to_{modality}_top1": backward / len(candidates), f"{modality}_{other}_n": float(len(queries))}


class _Embedder:
    """`embed(sources, modality)` -> [N, D]: texts as strings, each file through one ImageEmbeddings cache per
    modality, so a file scored in several pairs is embedded once."""

    def __init__(self, model, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.files: dict[str, ImageEmbeddings] = {}

    def __call__(self, sources: list, modality: str) -> torch.Tensor:
        if modality == "text":
            return embed_texts(self.model, sources, self.batch_size)
        if modality not in self.files:
            self.files[modality] = ImageEmbeddings(self.model, self.batch_size, modality=modality)
        return self.files[modality](sources)[0]


def _key(source, modality: str) -> Hashable:
    return source if modality == "text" else image_key(source)


def _meaning(record: dict) -> Hashable | None:
    return (record["label"], record.get("motion")) if record.get("label") else None
