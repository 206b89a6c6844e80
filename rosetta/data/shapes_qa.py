"""Questions and answers about the built-in shapes: what a vision-language model is trained and scored on.

Each scene's record already says what is in it (shapes, colours, where, the background), so the answers are
known exactly. For every split, beside SPLIT.jsonl:

- SPLIT-conversations.jsonl: LLaVA's instruction-tuning format, one multi-turn conversation per image,
  `{"image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`;
- SPLIT-vqa.jsonl: one attribute question per row (`type` colour, shape, count or position), with `answers`;
- SPLIT-pope.jsonl: POPE's yes/no object probes, "Is there a ... in the image?", half of them "no"; a "no"
  names an object drawn at random from those absent (`type` random) or one sharing a colour or a shape with
  what is there (`type` adversarial), the hallucinations a model is most tempted by.

The same records and seed give the same questions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rosetta.data.builtin import _WHERE, CLASSES, SPLITS, _noun
from rosetta.data.records import read_records, write_manifest

ATTRIBUTES = ("colour", "shape", "count", "position")
COUNT_WORDS = {1: "1", 2: "2"}
QUESTIONS = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?", "Which colour is the {shape}?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?", "What is the {color} shape?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes."),
    "where": ("Where is the {x}?", "Where in the image is the {x}?"),
    "side": ("Is the {x} to the left or to the right of the {y}?",),
    "height": ("Is the {x} above or below the {y}?",),
    "pope": ("Is there {x} in the image?",),
}


def make_shape_questions(data: str | os.PathLike, seed: int = 0, splits: tuple[str, ...] = SPLITS
                         ) -> dict[str, int]:
    """Write the conversations, VQA and POPE manifests for each split of a shapes dataset in `data` (made by
    make_shapes); returns the number of questions per split."""
    data = Path(data)
    made = {}
    for split in splits:
        records = list(read_records(data / f"{split}.jsonl"))
        conversations, vqa, pope = [], [], []
        for index, record in enumerate(records):
            rng = np.random.default_rng([seed, SPLITS.index(split), index, 7])
            with Image.open(record["image"]) as picture:
                size = picture.width
            attributes, probes = scene_questions(record["shapes"], size, rng)
            image = os.path.relpath(record["image"], data)
            turns = attributes + probes
            order = rng.permutation(len(turns))
            dialogue = []
            for n, i in enumerate(order):
                question, answer, _ = turns[i]
                dialogue += [{"from": "human", "value": ("<image>\n" if n == 0 else "") + question},
                             {"from": "gpt", "value": answer}]
            conversations.append({"key": record["key"], "image": image, "conversations": dialogue})
            vqa += [{"key": f"{record['key']}-{kind}", "image": image, "question": q, "answers": [a], "type": kind}
                    for q, a, kind in attributes]
            pope += [{"key": f"{record['key']}-{a}", "image": image, "question": q, "answer": a, "type": kind}
                     for q, a, kind in probes]
        write_manifest(conversations, data / f"{split}-conversations.jsonl")
        write_manifest(vqa, data / f"{split}-vqa.jsonl")
        write_manifest(pope, data / f"{split}-pope.jsonl")
        made[split] = len(vqa) + len(pope)
    return made


def scene_questions(shapes: list[dict[str, Any]], size: int, rng: np.random.Generator
                    ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(question, answer, type) about one scene: one of each attribute, and two POPE probes (a yes and a no)."""
    def pick(kind: str, **names: str) -> str:
        forms = QUESTIONS[kind]
        return forms[int(rng.integers(len(forms)))].format(**names)

    target = shapes[int(rng.integers(len(shapes)))]
    x = f"{target['color']} {target['shape']}"
    attributes = [
        (pick("colour", shape=target["shape"]), target["color"], "colour"),
        (pick("shape", color=target["color"]), target["shape"], "shape"),
        (pick("count"), COUNT_WORDS[len(shapes)], "count"),
    ]
    if len(shapes) == 1:
        attributes.append((pick("where", x=x), where(target, size), "position"))
    else:
        other = next(s for s in shapes if s is not target)
        y = f"{other['color']} {other['shape']}"
        dx, dy = target["x"] - other["x"], target["y"] - other["y"]
        if abs(dx) >= abs(dy):
            attributes.append((pick("side", x=x, y=y), "left" if dx < 0 else "right", "position"))
        else:
            attributes.append((pick("height", x=x, y=y), "above" if dy < 0 else "below", "position"))

    present = {f"{s['color']} {s['shape']}" for s in shapes}
    shown = shapes[int(rng.integers(len(shapes)))]
    absent = [c for c in CLASSES if c not in present]
    adversarial = [c for c in absent if any(part in c.split() for s in shapes for part in (s["color"], s["shape"]))]
    kind = "adversarial" if rng.integers(2) else "random"
    pool = adversarial if kind == "adversarial" else absent
    missing = pool[int(rng.integers(len(pool)))]
    probes = [(pick("pope", x=_noun(shown["color"], shown["shape"])), "yes", kind),
              (pick("pope", x=_noun(*missing.split())), "no", kind)]
    return attributes, probes


def where(shape: dict[str, Any], size: int) -> str:
    """Which ninth of a `size`-pixel image a shape's centre is in ("top left" ... "bottom right")."""
    return _WHERE[min(3 * shape["y"] // size, 2)][min(3 * shape["x"] // size, 2)]
