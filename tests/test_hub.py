"""Hub ids resolve through huggingface_hub's cache; without network or cache, one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import rosetta
from rosetta.errors import ModelNotFoundError


def _put_in_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay a snapshot out as huggingface_hub's cache does (refs/main -> snapshots/<revision>/...)."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.file_download.HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr("huggingface_hub._snapshot_download.HF_HUB_CACHE", str(cache), raising=False)
    return cache


def test_hub_id_loads_from_the_cache_offline(tmp_path, offline_cache):
    model = rosetta.create("tiny")
    model.save_pretrained(tmp_path / "tiny")
    _put_in_hub_cache(offline_cache, "someone/tiny-clip", tmp_path / "tiny")
    loaded = rosetta.load("someone/tiny-clip")
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.embed_images(pixels), model.embed_images(pixels))


def test_not_cached_and_offline_is_one_line(offline_cache):
    with pytest.raises(ModelNotFoundError) as error:
        rosetta.load("someone/not-downloaded")
    message = str(error.value)
    assert "\n" not in message
    assert "someone/not-downloaded" in message and "not in the local cache" in message


@pytest.mark.parametrize("name, reason", [
    ("not-a-model", "unknown model"), ("tiny", "no pretrained weights"),
])
def test_unknown_names(name, reason):
    with pytest.raises(ModelNotFoundError, match=reason):
        rosetta.load(name)


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        rosetta.load(tmp_path / "weights.bin")


def test_pickled_weights_are_never_unpickled_beyond_tensors(tmp_path):
    """A .bin holding arbitrary objects is refused (weights_only), not executed."""
    import json
    import pickle

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(rosetta.RosettaError, match="refusing to unpickle"):
        rosetta.load(tmp_path)
    assert not (tmp_path / "pwned").exists()
