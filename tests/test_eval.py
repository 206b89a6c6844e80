"""Evaluation metrics against hand-computed answers, on a model whose embeddings the test chooses, and end to end
on the tiny random model with real PNG files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import rosetta
from rosetta.errors import InputError
from rosetta.eval import ImageEmbeddings, compositionality, evaluate, format_table, retrieval, write_results, zeroshot
from rosetta.eval.retrieval import recall_at_k


def at(degrees: float) -> list[float]:
    """A unit vector in the plane: cosine similarity between two of them is the cosine of the angle between."""
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


class ChosenEmbeddings:
    """A stand-in model: every image (named by a string) and text embeds to the vector the test gave it."""

    def __init__(self, vectors: dict[str, list[float]], broken: tuple[str, ...] = ()):
        self.vectors = vectors
        self.broken = broken
        self.images_embedded: list[str] = []
        self.templates = None

    def _lookup(self, items) -> torch.Tensor:
        return F.normalize(torch.tensor([self.vectors[item] for item in items], dtype=torch.float32), dim=-1)

    def embed_images(self, images, batch_size=32, progress=None):
        for image in images:
            if image in self.broken:
                raise InputError(f"{image}: not an image")
        self.images_embedded += images
        return self._lookup(images)

    def embed_texts(self, texts, batch_size=256, progress=None):
        return self._lookup(texts)

    def classifier(self, labels, templates=None):
        self.templates = templates
        return self._lookup(labels)


# Retrieval: images A, B, C at 0, 120 and 240 degrees; B has two captions.
RETRIEVAL_VECTORS = {"A": at(0), "B": at(120), "C": at(240), "a": at(10), "b": at(200), "b2": at(125), "c": at(290)}
RETRIEVAL_RECORDS = [
    {"image": "A", "text": "a"}, {"image": "B", "text": "b"}, {"image": "B", "text": "b2"}, {"image": "C", "text": "c"},
]


def test_retrieval_recall_matches_hand_ranking():
    # Text -> image ("image_retrieval"): a is nearest A (10 deg), b2 nearest B (5), c nearest C (50 vs A's 70);
    # b (200 deg) is nearer C (40) than its own B (80): 3 of 4 captions find their image first.
    # Image -> text ("text_retrieval"): A's nearest caption is a, B's is b2, but C's is b (40 deg, before c at 50):
    # 2 of 3 images. Everything is within the top 5 of 3 images / 4 captions.
    metrics = retrieval(ChosenEmbeddings(RETRIEVAL_VECTORS), RETRIEVAL_RECORDS)
    assert metrics == pytest.approx({
        "image_retrieval_recall@1": 3 / 4, "image_retrieval_recall@5": 1.0, "image_retrieval_recall@10": 1.0,
        "text_retrieval_recall@1": 2 / 3, "text_retrieval_recall@5": 1.0, "text_retrieval_recall@10": 1.0,
    })


def test_retrieval_embeds_each_image_once_and_skips_records_without_captions():
    model = ChosenEmbeddings(RETRIEVAL_VECTORS)
    records = [*RETRIEVAL_RECORDS, {"image": "A", "text": None, "label": "x"}, {"image": "C", "text": "  "}]
    assert retrieval(model, records)["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert sorted(model.images_embedded) == ["A", "B", "C"]


def test_a_caption_shared_by_two_images_is_one_query_with_both_as_positives():
    vectors = {"A": at(0), "B": at(180), "D": at(90), "x": at(10), "d": at(90)}
    records = [{"image": "A", "text": "x"}, {"image": "B", "text": "x"}, {"image": "D", "text": "d"}]
    metrics = retrieval(ChosenEmbeddings(vectors), records)
    # "x" finds A (one of its two images) first, "d" finds D; image B's nearest caption is d (90 deg, x is at 170).
    assert metrics["image_retrieval_recall@1"] == 1.0
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_recall_at_k_counts_the_best_positive_and_ties_against_the_model():
    scores = torch.full((3, 12), 0.1)
    scores[0, :7] = torch.tensor([0.5, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6])  # positive 0 ranks 7th
    scores[1, :2] = 0.5  # positive 0 tied with negative 1: ranks 2nd
    scores[2, 3], scores[2, 4], scores[2, 5] = 0.2, 0.9, 0.3  # positives 3 and 4; 4 is first
    recall = recall_at_k(scores, torch.eye(12), [[0], [0], [3, 4]], ks=(1, 5, 10))
    assert recall == pytest.approx({1: 1 / 3, 5: 2 / 3, 10: 1.0})


ZEROSHOT_VECTORS = {f"c{i}": np.eye(6)[i].tolist() for i in range(6)}
ZEROSHOT_VECTORS |= {"first": [6, 5, 4, 3, 2, 1], "second": [1, 6, 5, 4, 3, 2]}
# With orthonormal classes, an image's score for class i is proportional to its i-th weight.
ZEROSHOT_RECORDS = [
    {"image": "first", "label": "c0"},   # c0 ranks 1st: right
    {"image": "first", "label": "c1"},   # c1 ranks 2nd: wrong at 1, right at 5
    {"image": "first", "label": "c5"},   # c5 ranks 6th: wrong at 5
    {"image": "second", "label": "c1"},  # right
    {"image": "first", "label": "c0"},   # right
    {"image": "second", "label": None},  # no label: not classified
    {"image": "second", "text": "no label key"},
]


def test_zeroshot_accuracy_and_mean_per_class_recall():
    model = ChosenEmbeddings(ZEROSHOT_VECTORS)
    classes = [f"c{i}" for i in range(6)]
    metrics = zeroshot(model, ZEROSHOT_RECORDS, classes=classes, templates="imagenet")
    # per class: c0 2/2, c1 1/2, c5 0/1; classes without images (c2, c3, c4) do not count
    assert metrics == pytest.approx({"acc1": 3 / 5, "acc5": 4 / 5, "mean_per_class_recall": (1 + 0.5 + 0) / 3})
    assert model.templates == "imagenet"


def test_zeroshot_classes_default_to_the_labels_and_acc5_to_all_of_fewer_than_five():
    metrics = zeroshot(ChosenEmbeddings(ZEROSHOT_VECTORS), ZEROSHOT_RECORDS)
    # classes c0, c1, c5: "first" scores them 6, 5, 1 so c1 and c5 are still wrong at 1; acc5 is top-3 of 3.
    assert metrics == pytest.approx({"acc1": 3 / 5, "acc5": 1.0, "mean_per_class_recall": 0.5})


def test_zeroshot_ties_count_against_the_model():
    vectors = {"cat": [1, 0], "dog": [0, 1], "between": [1, 1]}
    metrics = zeroshot(ChosenEmbeddings(vectors), [{"image": "between", "label": "cat"}], classes=["cat", "dog"])
    assert metrics["acc1"] == 0.0


def test_zeroshot_rejects_labels_outside_the_classes():
    with pytest.raises(InputError, match="'c5'.*not one of the 2 classes"):
        zeroshot(ChosenEmbeddings(ZEROSHOT_VECTORS), ZEROSHOT_RECORDS, classes=["c0", "c1"])


def test_compositionality_is_the_fraction_strictly_closer_to_the_caption():
    vectors = {
        "I1": at(0), "t1": at(10), "n1": at(30),     # caption nearer: right
        "I2": at(90), "t2": at(150), "n2": at(100),  # negative nearer: wrong
        "I3": at(180), "t3": at(170), "n3": at(170),  # a tie: wrong
    }
    records = [{"image": f"I{i}", "text": f"t{i}", "negative": f"n{i}"} for i in (1, 2, 3)]
    records.append({"image": "I1", "text": "t1"})  # no negative: not counted
    assert compositionality(ChosenEmbeddings(vectors), records) == {"acc": pytest.approx(1 / 3), "n": 3}


def test_evaluate_runs_the_tasks_the_records_allow_and_embeds_each_image_once():
    vectors = RETRIEVAL_VECTORS | {"n": at(180), "c0": at(0), "c1": at(120), "c2": at(240)}
    records = [
        {"image": "A", "text": "a", "label": "c0", "negative": "n"},
        {"image": "B", "text": "b", "label": "c1"},
        {"image": "B", "text": "b2", "label": "c1"},
        {"image": "C", "text": "c", "label": "c2", "negative": "n"},
    ]
    model = ChosenEmbeddings(vectors)
    results = evaluate(model, records)
    assert list(results) == ["zeroshot", "retrieval", "compositionality"]
    assert results["zeroshot"]["acc1"] == 1.0
    assert results["retrieval"]["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert results["compositionality"] == {"acc": 1.0, "n": 2}
    assert sorted(model.images_embedded) == ["A", "B", "C"]

    only_captions = [{"image": r["image"], "text": r["text"]} for r in records]
    assert list(evaluate(ChosenEmbeddings(vectors), only_captions)) == ["retrieval"]
    only_labels = [{"image": r["image"], "label": r["label"]} for r in records]
    tasks = ("compositionality", "zeroshot")
    assert list(evaluate(ChosenEmbeddings(vectors), only_labels, tasks=tasks)) == ["zeroshot"]
    assert evaluate(ChosenEmbeddings(vectors), only_labels, tasks=("retrieval",)) == {}
    with pytest.raises(ValueError, match="unknown evaluation task 'linear_probe'"):
        evaluate(model, records, tasks=("linear_probe",))


def test_images_that_fail_to_load_raise_or_are_skipped_and_reported():
    vectors = RETRIEVAL_VECTORS | {"broken": at(45)}
    records = [*RETRIEVAL_RECORDS, {"image": "broken", "text": "a"}]
    with pytest.raises(InputError, match="broken: not an image"):
        retrieval(ChosenEmbeddings(vectors, broken=("broken",)), records)

    errors: list[InputError] = []
    model = ChosenEmbeddings(vectors, broken=("broken",))
    images = ImageEmbeddings(model, batch_size=2, on_error=errors.append)
    assert evaluate(model, records, images=images) == evaluate(ChosenEmbeddings(vectors), RETRIEVAL_RECORDS)
    assert [str(e) for e in errors] == ["broken: not an image"]


def test_format_table_and_results_file(tmp_path):
    results = {"zeroshot": {"acc1": 0.5, "acc5": 1.0}, "compositionality": {"acc": 0.25, "n": 4}}
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    assert [line.split() for line in lines[1:]] == [
        ["zeroshot", "acc1", "0.5000"], ["zeroshot", "acc5", "1.0000"],
        ["compositionality", "acc", "0.2500"], ["compositionality", "n", "4"],
    ]
    column = lines[0].index("metric")
    assert [line[column:].split()[0] for line in lines] == ["metric", "acc1", "acc5", "acc", "n"]  # aligned

    meta = {"dataset": "shapes", "model": "tiny", "split": "test"}
    path = write_results(tmp_path / "out" / "results.json", results, meta)
    assert json.loads(path.read_text()) == [
        {"dataset": "shapes", "model": "tiny", "split": "test", "task": "zeroshot_classification",
         "metrics": {"acc1": 0.5, "acc5": 1.0}},
        {"dataset": "shapes", "model": "tiny", "split": "test", "task": "image_caption_selection",
         "metrics": {"acc": 0.25, "n": 4}},
    ]
    write_results(path, {"retrieval": {"image_retrieval_recall@1": 1.0}}, meta)
    assert json.loads(path.read_text())["task"] == "zeroshot_retrieval"  # one task: one object, as CLIP_benchmark
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary files left behind


# End to end on the tiny model with real files.

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


def draw(path: Path, shapes: list[tuple[str, str, tuple[int, int, int, int]]]) -> str:
    image = Image.new("RGB", (32, 32), "white")
    pen = ImageDraw.Draw(image)
    for color, shape, box in shapes:
        (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLORS[color])
    image.save(path)
    return str(path)


def shape_records(root: Path) -> list[dict]:
    records = []
    for color in COLORS:
        for shape in ("circle", "square"):
            for i, box in enumerate([(4, 4, 20, 20), (10, 12, 30, 28)]):
                path = draw(root / f"{color}-{shape}-{i}.png", [(color, shape, box)])
                records.append({"image": path, "text": f"a {color} {shape}", "label": f"{color} {shape}"})
    path = draw(root / "pair.png", [("red", "circle", (0, 0, 14, 14)), ("blue", "square", (16, 16, 31, 31))])
    records.append({"image": path, "text": "a red circle and a blue square", "label": None,
                    "negative": "a blue circle and a red square"})
    return records


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return rosetta.create("tiny").eval()


def test_evaluate_on_the_tiny_model_agrees_with_its_own_scores(tmp_path, tiny):
    records = shape_records(tmp_path)
    results = evaluate(tiny, records, batch_size=5)
    assert results == evaluate(tiny, records, batch_size=64)  # batching does not change the answer

    labelled = [r for r in records if r["label"]]
    classes = sorted({r["label"] for r in labelled})
    probs = tiny.classify([r["image"] for r in labelled], classes)
    predicted = [classes[i] for i in probs.argmax(dim=1).tolist()]
    assert results["zeroshot"]["acc1"] == pytest.approx(np.mean([p == r["label"] for p, r in zip(predicted, labelled)]))

    images = tiny.embed_images([r["image"] for r in records])
    texts = tiny.embed_texts([r["text"] for r in records])
    # every image is distinct; identical captions are one query whose positives are all their images
    captions = sorted({r["text"] for r in records})
    caption_vectors = tiny.embed_texts(captions)
    best = (caption_vectors @ images.T).argmax(dim=1).tolist()
    hits = [records[j]["text"] == caption for caption, j in zip(captions, best)]
    assert results["retrieval"]["image_retrieval_recall@1"] == pytest.approx(np.mean(hits))
    best_caption = (images @ caption_vectors.T).argmax(dim=1).tolist()
    hits = [captions[j] == r["text"] for r, j in zip(records, best_caption)]
    assert results["retrieval"]["text_retrieval_recall@1"] == pytest.approx(np.mean(hits))
    assert all(0 <= v <= 1 for v in results["retrieval"].values())

    negative = tiny.embed_texts(records[-1]["negative"])[0]
    right = float(images[-1] @ texts[-1]) > float(images[-1] @ negative)
    assert results["compositionality"] == {"acc": float(right), "n": 1}
