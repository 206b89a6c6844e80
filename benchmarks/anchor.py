"""How far a frozen text anchor lets a bound tower go: retrieval R@1 of an oracle that knows each clip's meaning.

    python benchmarks/anchor.py [--quickstart runs/quickstart]

ImageBind's recipe trains a new tower against a frozen anchor, so a bound tower can tell apart only what the
anchor's embeddings tell apart. This takes the quickstart's image-text CLIP (`rosetta quickstart`) and, for each
bound dataset (spoken captions: a class; video clips: a class and a motion), places an oracle's vector at the
mean of the text embeddings of every *training* caption with the test record's meaning: the point a tower that
recognises the meaning perfectly, but cannot see which wording its caption used, is trained towards. It then
scores retrieval of the test captions exactly as `rosetta eval` scores the bound tower (a hit when the top caption
has the record's meaning). A ceiling far below the target says the anchor, not the bound tower, is what to fix.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

import rosetta
from rosetta.data.records import read_records
from rosetta.eval.retrieval import normalised
from rosetta.models.io import cpu_isa, cpuinfo


def meaning(record: dict) -> tuple:
    return record["label"], record.get("motion")


def ceiling(model, train: list[dict], test: list[dict]) -> tuple[float, float]:
    """(oracle R@1 on the whole meaning, oracle R@1 on the class alone)."""
    texts = defaultdict(list)
    for record in train:
        texts[meaning(record)].append(record["text"])
    targets = normalised(model.embed_texts([r["text"] for r in test]))
    centroids = {m: normalised(model.embed_texts(t)).mean(0) for m, t in texts.items()}
    oracle = normalised(torch.stack([centroids[meaning(r)] for r in test]))
    best = [test[j] for j in (oracle @ targets.T).argmax(dim=1).tolist()]
    meant = sum(meaning(b) == meaning(r) for r, b in zip(test, best)) / len(test)
    labelled = sum(b["label"] == r["label"] for r, b in zip(test, best)) / len(test)
    return meant, labelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    model_dir, data = args.quickstart / "run" / "model", args.quickstart / "data"
    print(f"CPU: {cpuinfo('model name')} ({cpu_isa()}); anchor: {model_dir}")
    model = rosetta.load(model_dir, dtype="fp32")
    with torch.inference_mode():
        for name in ("spoken", "videos"):
            train, test = data / f"{name}-train.jsonl", data / f"{name}-test.jsonl"
            if not train.exists() or not test.exists():
                print(f"{name}: skipped (no {train} or {test}; run `rosetta quickstart --task bind` first)")
                continue
            meant, labelled = ceiling(model, list(read_records(train)), list(read_records(test)))
            print(f"{name}: the oracle's top test caption has its meaning for {meant:.1%} of the records "
                  f"(its class for {labelled:.1%})")


if __name__ == "__main__":
    main()
