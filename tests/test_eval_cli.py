"""Training plots from a metrics.jsonl, and the `rosetta eval` / `rosetta plot` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from rosetta.cli import main
from rosetta.errors import RosettaError
from rosetta.eval.plot import plot_run

TINY = ["--model", "tiny", "--random-init", "--device", "cpu"]


def write_metrics(run: Path, rows: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return run


def training_rows(steps: int = 30) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "epoch": step / 10, "split": "train", "loss": 4 * math.exp(-step / 10),
                     "lr": 1e-3 * min(1, step / 5), "samples_per_s": 100.0 + step, "mfu": 0.3, "temperature": 0.07})
        if step % 10 == 0:
            rows.append({"step": step, "split": "val", "loss": 3 * math.exp(-step / 10), "acc1": step / 40,
                         "retrieval/image_retrieval_recall@1": step / 50, "compositionality/acc": 0.5})
    return rows


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_plot_run_draws_one_png_per_metric_group(tmp_path):
    run = write_metrics(tmp_path / "run", training_rows(), tail='{"step": 31, "split": "tr')  # torn last line
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "throughput.png", "train.png", "val.png"]
    for path in paths:
        assert path.parent == run / "plots"
        assert_png(path)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(p.name for p in paths)  # no temporary files


def test_plot_run_leaves_out_groups_without_metrics(tmp_path):
    run = write_metrics(tmp_path / "run", [{"step": s, "epoch": 0.0, "split": "train", "loss": 1 / s} for s in (1, 2)])
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png"]
    assert_png(paths[0])


def test_plot_run_errors_name_the_file(tmp_path):
    with pytest.raises(RosettaError, match="metrics.jsonl: no such file"):
        plot_run(tmp_path)
    run = write_metrics(tmp_path / "bad", training_rows(2))
    (run / "metrics.jsonl").write_text("{oops\n" + (run / "metrics.jsonl").read_text())
    with pytest.raises(RosettaError, match=r"metrics.jsonl:1: not a JSON line"):
        plot_run(run)
    with pytest.raises(RosettaError, match="no metrics to plot"):
        plot_run(write_metrics(tmp_path / "empty", []))


def test_plot_command_prints_the_png_paths(tmp_path, capsys):
    run = write_metrics(tmp_path / "run", [{"step": 1, "split": "train", "loss": 2.0, "lr": 0.1}])
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "plots" / "loss.png"), str(run / "plots" / "lr.png")]
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A dataset directory as `rosetta data builtin shapes` lays it out, with a few real PNGs."""
    pytest.importorskip("rosetta.data.records")
    root = tmp_path / "shapes"
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (color, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 180, 30)), ("blue", (30, 30, 220))]):
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "text": f"a {color} square", "label": f"{color} square"})
    Image.new("RGB", (32, 32), "white").save(root / "images" / "pair.png")
    rows.append({"image": "images/pair.png", "text": "a red square and a blue circle", "label": None,
                 "negative": "a blue square and a red circle"})
    (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "classes.json").write_text(json.dumps(["blue square", "green square", "red circle", "red square"]))
    return root


def test_eval_command_prints_a_table_and_writes_clip_benchmark_json(dataset, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", *TINY, "--data", str(dataset), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value"]
    assert {line.split()[0] for line in table[1:]} == {"zeroshot", "retrieval", "compositionality"}
    results = json.loads(out.read_text())
    assert [r["task"] for r in results] == ["zeroshot_classification", "zeroshot_retrieval", "image_caption_selection"]
    for r in results:
        assert r["dataset"] == str(dataset) and r["model"] == "tiny" and r["split"] == "test"
    assert set(results[0]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert results[2]["metrics"]["n"] == 1

    assert main(["eval", *TINY, "--data", str(dataset / "test.jsonl"), "--task", "retrieval"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]} == {"retrieval"}


def test_eval_command_skips_and_lists_images_that_do_not_load(dataset, capsys):
    (dataset / "images" / "1.png").write_bytes(b"not a png")
    assert main(["eval", *TINY, "--data", str(dataset), "--task", "zeroshot"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "1.png" in captured.err
    assert "acc1" in captured.out


def test_eval_command_errors_are_one_line(dataset, tmp_path, capsys):
    captions_only = {"image": str(dataset / "images" / "0.png"), "text": "a red square"}
    (dataset / "train.jsonl").write_text(json.dumps(captions_only) + "\n")
    for args in (["--data", str(tmp_path / "missing")],                                  # no such path
                 ["--data", str(dataset), "--split", "val"],                             # no such split
                 ["--data", str(dataset), "--split", "train", "--task", "zeroshot"]):    # no labels
        assert main(["eval", *TINY, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rosetta: ")
