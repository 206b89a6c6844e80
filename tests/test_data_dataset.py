"""PairDataset: records to (pixels, ids) in DataLoader workers, with one-line errors for bad samples."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rosetta.data import PairDataset
from rosetta.data.shard import write_shards
from rosetta.errors import InputError
from rosetta.modalities.image import load_image, preprocess
from rosetta.models.registry import create


@pytest.fixture(scope="module")
def model():
    return create("tiny")


@pytest.fixture
def records(tmp_path) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        out.append({"key": f"k{i}", "image": str(path), "text": f"caption number {i}", "label": i})
    return out


def test_items_are_preprocessed_pixels_and_token_ids(records, model):
    dataset = PairDataset.from_model(records, model)
    assert len(dataset) == 6
    pixels, ids = dataset[2]
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
    assert ids.dtype == torch.long and ids.shape == (model.config.text.context_length,)
    assert torch.equal(pixels, preprocess(load_image(records[2]["image"]), 32, model.config.image))
    assert torch.equal(ids, model.tokenize(["caption number 2"])[0])


def test_dataloader_workers(records, model):
    dataset = PairDataset.from_model(records, model)
    clone = pickle.loads(pickle.dumps(dataset))  # what spawn/forkserver workers receive
    assert torch.equal(clone[1][1], dataset[1][1])
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    pixels = torch.cat([b[0] for b in batches])
    ids = torch.cat([b[1] for b in batches])
    assert pixels.shape == (6, 3, 32, 32) and ids.shape == (6, 32)
    assert torch.equal(pixels[5], dataset[5][0]) and torch.equal(ids[5], dataset[5][1])


def test_reads_sources_and_shard_bytes(tmp_path, records, model):
    write_shards(records, tmp_path / "shards", size=4)
    from_shards = PairDataset.from_model(tmp_path / "shards", model)
    direct = PairDataset.from_model(records, model)
    assert isinstance(from_shards.records[0]["image"], bytes)
    assert torch.equal(from_shards[3][0], direct[3][0]) and torch.equal(from_shards[3][1], direct[3][1])


def test_bad_samples_raise_input_error_naming_the_file(tmp_path, records, model):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = [
        {"key": "broken", "image": str(tmp_path / "broken.jpg"), "text": "x"},
        {"key": "gone", "image": str(tmp_path / "gone.png"), "text": "x"},
        {"key": "silent", "image": records[0]["image"]},
        {"key": "blind", "text": "x"},
    ]
    dataset = PairDataset.from_model(bad, model)
    with pytest.raises(InputError, match=f"sample 'broken': {tmp_path / 'broken.jpg'}: "):
        dataset[0]
    with pytest.raises(InputError, match=f"sample 'gone': {tmp_path / 'gone.png'}: no such file"):
        dataset[1]
    with pytest.raises(InputError, match="sample 'silent': no text"):
        dataset[2]
    with pytest.raises(InputError, match="sample 'blind': no image"):
        dataset[3]
    with pytest.raises(InputError, match="broken.jpg"):  # from a worker too, as the same error type
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))


def test_builtin_shapes_feed_a_model(tmp_path, model):
    from rosetta.data.builtin import make_shapes

    make_shapes(tmp_path, 20, image_size=40)
    dataset = PairDataset.from_model(tmp_path / "train.jsonl", model)
    pixels, ids = next(iter(DataLoader(dataset, batch_size=8)))
    with torch.no_grad():
        image_features, text_features = model.encode_image(pixels), model.encode_text(ids)
    assert image_features.shape == text_features.shape == (8, model.config.embed_dim)
    assert Path(dataset.records[0]["image"]).is_file()
