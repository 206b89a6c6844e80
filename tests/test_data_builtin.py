"""The built-in shapes dataset: deterministic, balanced, and its captions say what the pixels show."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rosetta.cli import main
from rosetta.data.builtin import CLASSES, COLORS, SHAPES, make_shapes, split_sizes
from rosetta.data.records import read_records
from rosetta.errors import RosettaError

N = 300


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    assert make_shapes(out, N, seed=3) == {"train": 240, "val": 30, "test": 30}
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path, shapes):
    make_shapes(tmp_path / "again", N, seed=3)
    assert tree(tmp_path / "again") == tree(shapes)
    make_shapes(tmp_path / "other", N, seed=4)
    other = tree(tmp_path / "other")
    assert other.keys() == tree(shapes).keys()
    assert other["train.jsonl"] != tree(shapes)["train.jsonl"]


def test_worker_processes_do_not_change_the_bytes(tmp_path):
    make_shapes(tmp_path / "one", 60, seed=5, image_size=24, workers=1)
    make_shapes(tmp_path / "two", 60, seed=5, image_size=24, workers=2)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


def test_layout_and_classes(shapes):
    assert json.loads((shapes / "classes.json").read_text()) == CLASSES == sorted(CLASSES)
    assert len(CLASSES) == len(SHAPES) * len(COLORS) >= 20
    for split, n in split_sizes(N).items():
        records = list(read_records(shapes / f"{split}.jsonl"))
        assert len(records) == n
        assert all(r["image"] == str(shapes / "images" / split / f"{r['key']}.png") for r in records)
        assert sum(r["label"] is not None for r in records) == (n + 1) // 2
    lines = (shapes / "test.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["image"] == "images/test/test-000000.png"  # relative in the file


def test_single_shape_classes_are_balanced(tmp_path):
    make_shapes(tmp_path, 960, seed=0, image_size=16)
    labels = Counter(r["label"] for r in read_records(tmp_path / "test.jsonl") if r["label"])
    assert set(labels) == set(CLASSES)
    assert min(labels.values()) == max(labels.values()) == 2


def test_records_describe_their_images(shapes):
    records = [r for split in ("train", "val", "test") for r in read_records(shapes / f"{split}.jsonl")]
    forms = set()
    for r in records:
        image = Image.open(r["image"])
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.int32)
        assert {s["shape"] for s in r["shapes"]} <= set(SHAPES)
        for s in r["shapes"]:
            # The shape's centre pixel has its colour, nearer to it than to any other.
            centre = pixels[s["y"], s["x"]]
            distances = {name: np.abs(centre - rgb).sum() for name, rgb in COLORS.items()}
            assert min(distances, key=distances.get) == s["color"], r["key"]
            assert s["color"] in r["text"] and s["shape"] in r["text"]
        if r["label"] is not None:
            assert len(r["shapes"]) == 1 and r["label"] == f"{r['shapes'][0]['color']} {r['shapes'][0]['shape']}"
            assert "negative" not in r
        else:
            a, b = r["shapes"]
            assert a["shape"] != b["shape"] and a["color"] != b["color"]
        forms.add(r["text"].replace(r["background"], "BG").split(" a ")[0][:12])
    assert len(forms) >= 5  # captions come in varied sentence forms


def noun(color: str, shape: str) -> str:
    return ("an " if color[0] in "aeiou" else "a ") + f"{color} {shape}"


def test_negatives_swap_the_colours(shapes):
    test = [r for r in read_records(shapes / "test.jsonl") if r["label"] is None]
    assert test and all("negative" in r for r in test)
    for r in test:
        a, b = r["shapes"]
        expected = (r["text"].replace(noun(a["color"], a["shape"]), "<A>").replace(noun(b["color"], b["shape"]), "<B>")
                    .replace("<A>", noun(b["color"], a["shape"])).replace("<B>", noun(a["color"], b["shape"])))
        assert r["negative"] == expected != r["text"]


def test_builtin_command(tmp_path, capsys):
    assert main(["data", "builtin", "shapes", "--n", "20", "--out", str(tmp_path), "--seed", "1",
                 "--image-size", "32"]) == 0
    assert capsys.readouterr().err == (
        f"wrote 20 images (16 train, 2 val, 2 test) to {tmp_path}\n"
        f"wrote 120 questions about them (conversations, VQA, POPE) (96 train, 12 val, 12 test) to {tmp_path}\n")
    assert len((tmp_path / "val-vqa.jsonl").read_text().splitlines()) == 2 * 4
    assert len((tmp_path / "val-conversations.jsonl").read_text().splitlines()) == 2
    assert Image.open(tmp_path / "images" / "val" / "val-000001.png").size == (32, 32)
    assert main(["data", "builtin", "shapes", "--n", "0", "--out", str(tmp_path)]) == 2
    with pytest.raises(RosettaError, match="image-size"):
        make_shapes(tmp_path, 10, image_size=8)
