"""Search: text, image and composed queries against a store, as a Python task and as `rosetta search`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rosetta.cli import main
from rosetta.errors import RosettaError
from rosetta.search import query_vector, search
from rosetta.store import open_store
from rosetta.store.index import index_files


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = root / f"p{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (24 + 8 * i, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(params=["embedded", "milvus"])
def store(request, tmp_path, model, photos):
    if request.param == "milvus":
        pytest.importorskip("milvus_lite")
    s = open_store(tmp_path / ("m.db" if request.param == "milvus" else "store"), model="tiny", dim=64)
    index_files(model, s, photos)
    yield s
    s.close()


def stored_vectors(model, photos) -> dict[str, np.ndarray]:
    return dict(zip(map(str, photos), model.embed_images(photos).numpy()))


def test_image_text_and_composed_queries(store, model, photos):
    vectors = stored_vectors(model, photos)
    hits = search(model, store, image=photos[5], k=3)
    assert hits[0].id == str(photos[5]) and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].metadata["path"] == str(photos[5]) and len(hits) == 3

    text = model.embed_texts(["a dog on a beach"]).numpy()[0]
    hits = search(model, store, text="a dog on a beach", k=12)
    assert [h.id for h in hits] == sorted(vectors, key=lambda i: -float(vectors[i] @ text))

    image = model.embed_images([photos[3]]).numpy()[0]
    mixed = 0.3 * text + 0.7 * image
    mixed /= np.linalg.norm(mixed)
    np.testing.assert_allclose(query_vector(model, "a dog on a beach", photos[3], (0.3, 0.7)), mixed, atol=1e-5)
    hits = search(model, store, text="a dog on a beach", image=photos[3], weights=(0.3, 0.7), k=4)
    assert [h.id for h in hits] == sorted(vectors, key=lambda i: -float(vectors[i] @ mixed))[:4]
    for hit in hits:
        assert hit.score == pytest.approx(float(vectors[hit.id] @ mixed), abs=1e-4)
    only_text = search(model, store, text="a dog on a beach", image=photos[3], weights=(1, 0), k=12)
    assert [h.id for h in only_text] == [h.id for h in search(model, store, text="a dog on a beach", k=12)]


def test_where_filters_the_results(store, model, photos):
    hits = search(model, store, image=photos[0], k=5, where="height >= 40 and format = 'png'")
    assert len(hits) == 5 and all(h.metadata["height"] >= 40 and h.metadata["format"] == "png" for h in hits)
    assert {h.id for h in search(model, store, image=photos[0], k=5, where="height > 100")} == {
        str(p) for p in photos if Image.open(p).height > 100}


def test_bad_queries_are_refused(store, model):
    for kwargs, message in [
        ({}, "give a text, an image, a sound or a video"),
        ({"text": "x", "weights": (0.5, 0.5)}, "give both"),
        ({"text": "x", "image": np.zeros((8, 8, 3), np.uint8), "weights": (-1, 2)}, "non-negative"),
        ({"text": "x", "image": np.zeros((8, 8, 3), np.uint8), "weights": (0, 0)}, "not both zero"),
        ({"text": "x", "where": "width >"}, "where 'width >'"),
        ({"text": "x", "k": 0}, "k must be at least 1"),
    ]:
        with pytest.raises(RosettaError, match=message):
            search(model, store, **kwargs)
    model.name = "another-model"
    try:
        with pytest.raises(RosettaError, match="built with model 'tiny', not 'another-model@"):
            search(model, store, text="x")
    finally:
        del model.name


def test_cli_search(tmp_path, photos, capsys):
    store = str(tmp_path / "store")
    assert main(["index", str(photos[0].parent), "--store", store, "--model", "tiny", "--random-init",
                 "--device", "cpu"]) == 0
    capsys.readouterr()

    # The model comes from the store: the same seeded random weights find the query image itself.
    assert main(["search", "--store", store, "--random-init", "--device", "cpu", "--image", str(photos[4]),
                 "--k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and lines[0]["id"] == lines[0]["path"] == str(photos[4])
    assert lines[0]["score"] == pytest.approx(1.0, abs=1e-4) and lines[0]["metadata"]["width"] == 40

    assert main(["search", "--store", store, "--model", "tiny", "--random-init", "--device", "cpu",
                 "in black and white", "--image", str(photos[4]), "--weights", "0.3,0.7", "--k", "20",
                 "--where", "height > 60 and format = 'png'"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["path"] for line in lines} == {str(p) for i, p in enumerate(photos) if 24 + 8 * i > 60 and i % 2}
    assert [line["score"] for line in lines] == sorted((line["score"] for line in lines), reverse=True)

    for args, message in [
        (["--model", "vit-b-32", "x"], "built with model 'tiny@"),
        (["x", "--where", "width > > 3"], "where 'width > > 3': expected a number or a quoted string"),
        (["x", "--image", str(photos[0]), "--weights", "0.3"], "--weights 0.3: expected two numbers"),
        ([], "give a text query, --image, --audio or --video"),
    ]:
        assert main(["search", "--store", store, "--random-init", "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert main(["search", "--store", str(tmp_path / "nothing"), "--random-init", "x"]) == 2
    assert "no store here" in capsys.readouterr().err
