"""The compiled image tower (`rosetta serve --compile`, `rosetta index --compile`) gives the eager tower's
embeddings, for any batch size (padded to its step), and steps aside where it must."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import rosetta
from rosetta.models import compiled
from rosetta.models.compiled import compile_image_tower
from rosetta.serve import Settings, create_app


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    eager = rosetta.create("tiny").eval()
    twin = rosetta.create("tiny").eval()
    twin.load_state_dict(eager.state_dict())
    compile_image_tower(twin, step=8)
    yield eager, twin
    compiled._COMPILED.pop(twin, None)


def test_compiled_tower_gives_the_eager_embeddings_at_any_batch_size(models):
    eager, twin = models
    pixels = torch.randn(11, 3, 32, 32)
    with torch.inference_mode():
        want = eager.encode_image(pixels)
        for rows in (11, 3, 16):  # padded to 16, 8 and 16 rows: two graphs
            got = compiled.compiled_image_features(twin, pixels.repeat(2, 1, 1, 1)[:rows])
            assert got is not None and got.shape == (rows, want.shape[1])
            torch.testing.assert_close(got, want.repeat(2, 1)[:rows], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(twin.embed_images(pixels), eager.embed_images(pixels), atol=1e-4, rtol=1e-4)


def test_gradients_and_training_take_the_eager_tower(models):
    _, twin = models
    pixels = torch.randn(2, 3, 32, 32)
    assert compiled.compiled_image_features(twin, pixels) is None  # gradients recorded: frozen weights would not do
    features = twin.encode_image(pixels)
    assert features.requires_grad
    twin.train()
    try:
        with torch.no_grad():
            assert compiled.compiled_image_features(twin, pixels) is None
    finally:
        twin.eval()


def test_weights_changed_after_compiling_are_seen(models):
    eager, twin = models
    torch.manual_seed(1)
    other = rosetta.create("tiny").eval()
    pixels = torch.randn(4, 3, 32, 32)
    kept = {k: v.clone() for k, v in twin.state_dict().items()}
    try:
        twin.load_state_dict(other.state_dict())
        with torch.inference_mode():
            torch.testing.assert_close(twin.encode_image(pixels), other.encode_image(pixels), atol=1e-4, rtol=1e-4)
    finally:
        twin.load_state_dict(kept)
    with torch.inference_mode():
        torch.testing.assert_close(twin.encode_image(pixels), eager.encode_image(pixels), atol=1e-4, rtol=1e-4)
    assert twin in compiled._COMPILED


def test_an_input_the_tower_cannot_take_raises_and_keeps_the_compiled_tower(models):
    _, twin = models
    with torch.inference_mode(), pytest.raises(RuntimeError):
        twin.encode_image(torch.randn(2, 5, 32, 32))  # five channels: the eager tower refuses it too
    assert twin in compiled._COMPILED


def test_a_failing_compilation_warns_once_and_runs_eagerly(caplog):
    model = rosetta.create("tiny").eval()

    def broken(pixels):
        raise RuntimeError("no C++ compiler")

    compiled._COMPILED[model] = compiled._Compiled(broken, 8, compiled._versions(model))
    pixels = torch.randn(3, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="rosetta.models"), torch.inference_mode():
        first = model.encode_image(pixels)
        second = model.encode_image(pixels)
    assert model not in compiled._COMPILED
    assert sum("running eagerly" in r.getMessage() for r in caplog.records) == 1
    with torch.inference_mode():
        torch.testing.assert_close(first, model.vision_proj(model.vision(pixels)))
    torch.testing.assert_close(first, second)


def test_the_server_compiles_the_image_tower_when_asked(models):
    eager, _ = models
    model = rosetta.create("tiny").eval()
    model.load_state_dict(eager.state_dict())
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    with TestClient(create_app(model, None, Settings(model_name="tiny", compile=True))) as client:
        assert model in compiled._COMPILED
        reply = client.post("/v1/embed", files=[("images", ("a.png", buffer.getvalue(), "image/png"))])
    assert compiled._COMPILED.pop(model, None) is not None  # still there: the compiled tower answered
    assert reply.status_code == 200, reply.text
    with torch.inference_mode():
        want = eager.embed_images([buffer.getvalue()])
    np.testing.assert_allclose(reply.json()["image_embeddings"], want.numpy(), atol=1e-4)


def test_index_compiled_stores_the_vectors_an_eager_search_finds(tmp_path, capsys):
    from test_index import write_images

    from rosetta.cli import main

    photos = write_images(tmp_path / "photos", 5)
    before = set(compiled._COMPILED)
    assert main(["index", str(tmp_path / "photos"), "--store", str(tmp_path / "store"), "--model", "tiny",
                 "--random-init", "--device", "cpu", "--batch-size", "4", "--compile"]) == 0
    indexer, = set(compiled._COMPILED) - before
    del compiled._COMPILED[indexer]  # the search below runs eagerly
    capsys.readouterr()
    for photo in photos:  # batches of 4 and 1, both padded to 8
        assert main(["search", "--store", str(tmp_path / "store"), "--image", str(photo), "--k", "1", "--model",
                     "tiny", "--random-init", "--device", "cpu"]) == 0
        hit = json.loads(capsys.readouterr().out)
        assert hit["id"] == str(photo) and hit["score"] == pytest.approx(1.0, abs=1e-4)
