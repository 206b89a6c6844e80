"""The `rosetta` command end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

TINY = ["--model", "tiny", "--random-init", "--device", "cpu"]


def rosetta(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rosetta", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "nested").mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)).save(root / "nested" / "b.png")
    (root / "notes.txt").write_text("not an image, and not picked up from a directory")
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory, images) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    truncated = root / "truncated.jpg"
    truncated.write_bytes((images / "a.jpg").read_bytes()[:200])
    text = root / "text.png"
    text.write_text("hello")
    bomb = root / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx, a few kB on disk
    return {"truncated": truncated, "text": text, "bomb": bomb, "missing": root / "missing.jpg"}


def test_help_names_every_command():
    out = rosetta("--help")
    assert out.returncode == 0
    for command in ("embed", "classify"):
        assert command in out.stdout
        sub = rosetta(command, "--help")
        assert sub.returncode == 0 and "--model" in sub.stdout and "--random-init" in sub.stdout


def test_classify_prints_one_json_line_per_image(images):
    out = rosetta("classify", *TINY, "--labels", "dog, cat,car", str(images))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(line["path"]).name for line in lines] == ["a.jpg", "b.png"]
    for line in lines:
        assert set(line["probs"]) == {"dog", "cat", "car"}
        assert line["label"] == max(line["probs"], key=line["probs"].get)
        assert line["score"] == line["probs"][line["label"]]
        assert sum(line["probs"].values()) == pytest.approx(1.0, abs=1e-4)


def test_embed_images_to_npy_and_parquet(images, tmp_path):
    out = rosetta("embed", *TINY, str(images), "--out", str(tmp_path / "e.npy"))
    assert out.returncode == 0, out.stderr
    array = np.load(tmp_path / "e.npy")
    assert array.shape == (2, 64) and np.allclose(np.linalg.norm(array, axis=1), 1, atol=1e-5)

    out = rosetta("embed", *TINY, str(images / "a.jpg"), "--out", str(tmp_path / "e.parquet"))
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "e.parquet").to_pylist()
    assert table[0]["path"].endswith("a.jpg") and len(table[0]["embedding"]) == 64


def test_embed_texts(tmp_path):
    out = rosetta("embed", *TINY, "--text", "a dog", "a cat", "--out", str(tmp_path / "t.parquet"))
    assert out.returncode == 0, out.stderr
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert [r["text"] for r in rows] == ["a dog", "a cat"]
    assert not np.allclose(rows[0]["embedding"], rows[1]["embedding"])


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "corrupt or truncated"), ("text", "not an image"), ("bomb", "decompression bomb"),
    ("missing", "no such file"),
])
def test_bad_input_is_one_line_and_the_rest_still_run(images, bad, kind, reason):
    out = rosetta("classify", *TINY, "--labels", "dog,cat", str(bad[kind]), str(images / "a.jpg"))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert str(bad[kind]) in line and reason in line
    assert len(out.stdout.splitlines()) == 1  # the good image was still classified


@pytest.mark.parametrize("args, reason", [
    ([*TINY, "--labels", " , "], "at least one label"),
    (["--model", "no-such-model", "--labels", "a"], "unknown model"),
    (["--model", "tiny", "--labels", "a"], "no pretrained weights"),
])
def test_bad_arguments_are_one_line(images, args, reason):
    out = rosetta("classify", *args, str(images / "a.jpg"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert reason in line


def test_no_network_and_no_cache_is_one_line(images, tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = rosetta("classify", "--model", "openai/clip-vit-base-patch32", "--labels", "a", str(images), env=env)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "openai/clip-vit-base-patch32" in line and "not in the local cache" in line
