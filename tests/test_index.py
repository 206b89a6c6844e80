"""Indexing images into a store: metadata, content hashes, incremental reruns, bad files, manifests, the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rosetta
from rosetta.cli import main
from rosetta.errors import RosettaError
from rosetta.store import open_store
from rosetta.store.base import same_model, split_model
from rosetta.store.index import IndexReport, index_files, index_source, model_name, weights_fingerprint


def write_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / ("nested" if i % 3 == 0 else "") / f"img{i:02d}.{'png' if i % 4 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 30 + i, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class Counting:
    """The model, counting the images it embeds."""

    def __init__(self, model):
        self.model, self.embedded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def embed_images(self, images, **kwargs):
        self.embedded += len(images)
        return self.model.embed_images(images, **kwargs)


def test_index_files_stores_vectors_metadata_and_hashes(tmp_path, model):
    paths = write_images(tmp_path / "photos", 5)
    store = open_store(tmp_path / "store", model="tiny", dim=64)
    report = index_files(model, store, paths, batch_size=2)
    assert isinstance(report, IndexReport) and list(report) == [str(p) for p in paths]
    assert (report.added, report.updated, report.unchanged, report.failed) == (5, 0, 0, [])
    meta = store.metadata([str(paths[4])])[str(paths[4])]
    assert meta["path"] == str(paths[4])
    assert (meta["width"], meta["height"], meta["format"]) == (34, 36, "png")
    assert meta["bytes"] == paths[4].stat().st_size and meta["mtime"] == paths[4].stat().st_mtime
    assert store.hashes()[str(paths[1])] == hashlib.sha256(paths[1].read_bytes()).hexdigest()
    expected = model.embed_images([paths[2]]).numpy()
    hit = store.search(expected, k=1)[0][0]
    assert hit.id == str(paths[2]) and hit.score == pytest.approx(1.0, abs=1e-4)
    assert model_name(model) == f"tiny@{weights_fingerprint(model)}"


@pytest.mark.parametrize("backend", ["embedded", "milvus"])
def test_rerun_embeds_only_new_and_changed_files(tmp_path, model, backend):
    if backend == "milvus":
        pytest.importorskip("milvus_lite")
    paths = write_images(tmp_path / "photos", 6)
    store = open_store(tmp_path / ("store.db" if backend == "milvus" else "store"), model="tiny", dim=64)
    counting = Counting(model)
    index_source(counting, store, tmp_path / "photos", batch_size=4)
    assert counting.embedded == 6
    counting.embedded = 0
    report = index_source(counting, store, tmp_path / "photos", batch_size=4)
    assert (counting.embedded, report.added, report.unchanged, report.removed) == (0, 0, 6, 0)

    Image.new("RGB", (50, 40), "red").save(paths[1])  # changed
    paths[1].touch()
    paths[2].unlink()  # deleted
    write_images(tmp_path / "photos" / "more", 1, seed=9)  # new
    paths[3].touch()  # same bytes, new mtime: not embedded again
    report = index_source(counting, store, tmp_path / "photos", batch_size=4)
    assert (counting.embedded, report.added, report.updated, report.unchanged, report.removed) == (2, 1, 1, 4, 1)
    assert len(store) == 6 and str(paths[2]) not in store.hashes()
    assert store.metadata([str(paths[1])])[str(paths[1])]["width"] == 50
    red = model.embed_images([paths[1]]).numpy()
    assert store.search(red, k=1)[0][0].id == str(paths[1])


def test_bad_files_are_listed_and_skipped(tmp_path, model):
    paths = write_images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.jpg").write_bytes(paths[1].read_bytes()[:100])
    (tmp_path / "photos" / "text.png").write_text("not an image")
    store = open_store(tmp_path / "store", model="tiny", dim=64)
    report = index_source(model, store, tmp_path / "photos")
    assert report.added == 3 and len(store) == 3
    assert sorted(line.split(":")[0].rsplit("/", 1)[-1] for line in report.failed) == ["broken.jpg", "text.png"]
    assert all("\n" not in line for line in report.failed)


def test_manifest_columns_become_metadata(tmp_path, model):
    paths = write_images(tmp_path / "photos", 3)
    manifest = tmp_path / "photos" / "list.jsonl"
    rows = [{"image": p.relative_to(manifest.parent).as_posix(), "label": f"l{i}", "score": i / 2}
            for i, p in enumerate(paths)]
    manifest.write_text("\n".join(map(json.dumps, rows)) + "\n")
    store = open_store(tmp_path / "store", model="tiny", dim=64)
    counting = Counting(model)
    index_source(counting, store, manifest)
    meta = store.metadata([str(paths[2])])[str(paths[2])]
    assert (meta["label"], meta["score"], meta["width"], meta["source"]) == ("l2", 1.0, 32, str(manifest))
    hits = store.search(model.embed_images([paths[0]]).numpy(), k=3, where="label = 'l1' or score >= 1")[0]
    assert sorted(h.metadata["label"] for h in hits) == ["l1", "l2"]

    rows[0]["label"] = "fixed"  # a changed column is stored again
    del rows[2]  # a row gone from the manifest is removed
    manifest.write_text("\n".join(map(json.dumps, rows)) + "\n")
    counting.embedded = 0
    report = index_source(counting, store, manifest)
    assert (report.updated, report.unchanged, report.removed, counting.embedded) == (1, 1, 1, 1)
    assert store.metadata([str(paths[0])])[str(paths[0])]["label"] == "fixed"


def test_a_store_refuses_another_model(tmp_path, model):
    paths = write_images(tmp_path / "photos", 1)
    store = open_store(tmp_path / "store", model="vit-b-32", dim=64)
    with pytest.raises(RosettaError, match="built with model 'vit-b-32', not 'tiny@"):
        index_files(model, store, paths)


def test_the_fingerprint_tells_weights_apart_not_names_or_dtypes(tmp_path, model):
    def same(a, b) -> bool:
        return same_model(model_name(a), model_name(b))

    torch.manual_seed(1)
    other = rosetta.create("tiny").eval()  # the same preset, other (random) weights
    assert not same(other, model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = rosetta.load(tmp_path / "saved")
    assert weights_fingerprint(reloaded) == weights_fingerprint(model)
    for dtype in (torch.bfloat16, torch.float16):  # a cast is the same model
        assert same(copy.deepcopy(model).to(dtype), model)
    trained = copy.deepcopy(model)  # weights moved by 5%, as a fine-tuning run moves them: another model
    with torch.no_grad():
        for p in trained.vision.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    assert not same(trained, model)
    lit = copy.deepcopy(model)  # a new text tower on the locked image tower: the stored vectors still hold
    with torch.no_grad():
        for p in lit.text.parameters():
            p.normal_()
    assert same(lit, model)

    paths = write_images(tmp_path / "photos", 2)
    store = open_store(tmp_path / "store", model=model_name(model), dim=64)
    index_files(model, store, paths)
    with pytest.raises(RosettaError, match="built with model 'tiny@"):  # same name, other weights
        index_files(other, store, paths)
    reloaded.name = str(tmp_path / "saved")  # the same weights under another name: the same model
    assert len(index_files(reloaded, store, paths).ids) == 2
    legacy = open_store(tmp_path / "legacy", model="tiny", dim=64)  # a name recorded before fingerprints
    assert len(index_files(other, legacy, paths).ids) == 2
    other.name = "/checkpoints/clip@v2"  # an @ in a name is not a fingerprint
    at_sign = open_store(tmp_path / "at", model="/checkpoints/clip@v2", dim=64)
    assert len(index_files(other, at_sign, paths).ids) == 2
    assert split_model(model_name(other))[0] == "/checkpoints/clip@v2"


def test_cli_search_knows_a_model_by_its_weights_under_another_name(tmp_path, capsys):
    photos = write_images(tmp_path / "photos", 3)
    assert main(["index", str(tmp_path / "photos"), "--store", str(tmp_path / "store"), "--model", "tiny",
                 "--random-init", "--device", "cpu"]) == 0
    torch.manual_seed(0)  # what --random-init makes, saved as a checkpoint directory
    rosetta.create("tiny").save_pretrained(tmp_path / "same")
    capsys.readouterr()
    assert main(["search", "--store", str(tmp_path / "store"), "--model", str(tmp_path / "same"),
                 "--image", str(photos[1]), "--k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == str(photos[1])


def test_cli_index_then_rerun(tmp_path, capsys):
    write_images(tmp_path / "photos", 4)
    (tmp_path / "photos" / "bad.jpg").write_text("nope")
    args = ["index", str(tmp_path / "photos"), "--store", str(tmp_path / "store"),
            "--model", "tiny", "--random-init", "--device", "cpu", "--batch-size", "3"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "bad.jpg: not an image file" in err and "4 new" in err and "1 failed" in err
    (tmp_path / "photos" / "bad.jpg").unlink()
    assert main(args) == 0
    assert "0 new, 0 changed, 4 unchanged" in capsys.readouterr().err
    store = open_store(tmp_path / "store")
    assert (store.model.partition("@")[0], store.dim, len(store)) == ("tiny", 64, 4)
    other = ["index", str(tmp_path / "photos"), "--store", str(tmp_path / "store"), "--model", "vit-b-32",
             "--random-init", "--device", "cpu"]
    assert main(other) == 2
    assert "built with model 'tiny@" in capsys.readouterr().err
