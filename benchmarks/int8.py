"""int8 on a trained model: the same zero-shot answers as fp32, and embeddings within cosine 0.99.

    python benchmarks/int8.py [--quickstart runs/quickstart]

`rosetta quickstart` leaves a trained CLIP and the built-in shapes test split in runs/quickstart. This loads the
model in fp32 and in int8, classifies every test image zero-shot with both, and prints top-1 of each, on how many
images the two predict the same class (target >= 99%) and the cosine between their image embeddings (target
>= 0.99). int8's speed is in benchmarks/embed.py (ViT-B/32 against open_clip fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import rosetta
from rosetta.data.records import read_records
from rosetta.eval.retrieval import ImageEmbeddings, normalised
from rosetta.eval.zeroshot import labelled
from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo


def agreement(quickstart: Path) -> None:
    model_dir, data = quickstart / "run" / "model", quickstart / "data"
    if not (model_dir / "config.json").exists() or not (data / "test.jsonl").exists():
        print(f"\nzero-shot agreement: skipped (no trained model in {quickstart}; run `rosetta quickstart` first)")
        return
    rows = labelled(read_records(data / "test.jsonl"))
    classes = json.loads((data / "classes.json").read_text())
    target = torch.tensor([classes.index(str(r["label"])) for r in rows])
    fp32 = rosetta.load(model_dir, dtype="fp32")
    int8 = rosetta.load(model_dir, dtype="int8")
    results = {}
    with torch.inference_mode():
        for name, model in (("fp32", fp32), ("int8", int8)):
            vectors, kept = ImageEmbeddings(model)([r["image"] for r in rows])
            assert len(kept) == len(rows), "every test image loads"
            results[name] = (vectors, vectors @ normalised(model.classifier(classes)).T)
    (v32, s32), (v8, s8) = results["fp32"], results["int8"]
    p32, p8 = s32.argmax(1), s8.argmax(1)
    print(f"\nzero-shot on the shapes test split ({len(rows)} images, {len(classes)} classes), {model_dir}:")
    print(f"  top-1 fp32 {(p32 == target).double().mean():.4f}, int8 {(p8 == target).double().mean():.4f}")
    print(f"  same prediction on {(p32 == p8).double().mean():.2%} of the images (target >= 99%)")
    print(f"  cosine(int8, fp32) image embeddings: min {F.cosine_similarity(v8, v32).min():.5f}, "
          f"mean {F.cosine_similarity(v8, v32).mean():.5f} (target >= 0.99)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}, cpu: {cpuinfo('model name') or '?'} ({cpu_isa()}), "
          f"native bf16: {cpu_has_fast_bf16()}")
    agreement(args.quickstart)


if __name__ == "__main__":
    main()
