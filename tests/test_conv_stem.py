"""The convolutional stem: a ViT option for training from scratch on little data (the quickstart's model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rosetta
from rosetta.models.config import PRESETS, ContrastiveConfig
from rosetta.train.flops import tower_flops


def config(stem: str, image_size: int = 64, patch_size: int = 16) -> ContrastiveConfig:
    tiny = PRESETS["tiny"]
    vision = dataclasses.replace(tiny.vision, image_size=image_size, patch_size=patch_size, width=128, stem=stem)
    return dataclasses.replace(tiny, vision=vision)


def test_the_stem_ends_on_the_patch_grid():
    cfg = config("conv", image_size=48, patch_size=8)
    assert cfg.vision.stem_channels == (32, 64, 128)
    model = rosetta.create(cfg)
    tokens = model.vision.tokens(torch.randn(2, 3, 48, 48))
    assert tokens.shape == (2, 36 + 1, 128)
    assert model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, cfg.embed_dim)
    with pytest.raises(ValueError, match="power-of-two"):
        rosetta.create(config("conv", image_size=48, patch_size=12))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        rosetta.create(config("conv", image_size=50, patch_size=8))
    with pytest.raises(ValueError, match="unknown vision stem"):
        rosetta.create(config("hybrid"))


def test_stem_flops_match_torch_counter():
    """The MFU numerator: the stems' FLOPs differ by what torch's own counter finds."""
    counted, computed = {}, {}
    for stem in ("patch", "conv"):
        model = rosetta.create(config(stem))
        with FlopCounterMode(display=False) as counter:
            model.encode_image(torch.randn(1, 3, 64, 64))
        counted[stem], computed[stem] = counter.get_total_flops(), tower_flops(config(stem))[0]
    assert computed["conv"] - computed["patch"] == counted["conv"] - counted["patch"] > 0


def test_round_trip_and_export_refused(tmp_path):
    model = rosetta.create(config("conv"))
    model.save_pretrained(tmp_path / "m")
    again = rosetta.load(tmp_path / "m")
    assert again.config.vision.stem == "conv"
    pixels = torch.randn(3, 3, 64, 64)
    assert torch.equal(again.embed_images(pixels), model.embed_images(pixels))
    with pytest.raises(rosetta.RosettaError, match="CLIP's architecture"):
        model.save_pretrained(tmp_path / "hf", format="transformers")


def test_he_initialised_so_the_signal_survives_the_stack():
    stem = rosetta.create(config("conv")).vision.patch_embed
    x = torch.randn(64, 3, 64, 64)
    for layer in list(stem)[:-1]:
        x = layer(x)
    assert 0.3 < x.std().item() < 3
