"""Hugging Face transformers Idefics3ForConditionalGeneration and SmolVLMForConditionalGeneration checkpoints
(SmolVLM), both directions: a SigLIP tower read at its last, normalised states, Idefics3's pixel-shuffle
connector, a Llama; images cut into tiles as SmolVLM's image processor cuts them (rosetta.models.vlm.Tiling).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rosetta.convert import clip, llama
from rosetta.convert.mapping import Rule, rule, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors

NAME = "transformers"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MODEL_TYPES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") in MODEL_TYPES


def read(directory: Path):
    from rosetta.models.io import read_weights

    config = read_config(directory)
    return config, read_weights(directory, WEIGHT_FILES), rules(config)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def read_config(directory: Path):
    from rosetta.models.config import ImageConfig
    from rosetta.models.vlm import Tiling, VLMConfig

    hf = _json(directory / "config.json")
    v = {"image_size": 224, "patch_size": 32, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu_pytorch_tanh",
         "layer_norm_eps": 1e-6, **hf.get("vision_config", {})}
    # No attention-pool head: the states themselves are read.
    vision = dataclasses.replace(clip.vision_config(v, siglip=True), pool="mean")
    t = {"model_type": "llama", **hf.get("text_config", {})}
    if "tie_word_embeddings" in hf:
        t["tie_word_embeddings"] = hf["tie_word_embeddings"]
    text = llama.lm_config(t, _json(directory / "generation_config.json"), directory)
    p = clip.preprocessor_settings(directory)
    tile = (p.get("max_image_size") or {}).get("longest_edge", vision.image_size)
    if tile != vision.image_size:
        raise RosettaError(f"{directory}: tiles of {tile} px for a tower of {vision.image_size} px")
    splitting = p.get("do_image_splitting", True)
    longest = (p.get("size") or {}).get("longest_edge", 4 * tile) if splitting else tile
    half = (0.5, 0.5, 0.5)
    image = ImageConfig(resize="squash", interpolation=_RESAMPLE.get(p.get("resample", 1), "lanczos"),
                        mean=tuple(p.get("image_mean", half)), std=tuple(p.get("image_std", half)))
    return VLMConfig(vision=vision, text=text, image=image, image_token_id=hf.get("image_token_id", 128257),
                     feature_layer=-1, projector="shuffle", projector_bias=False,
                     scale_factor=hf.get("scale_factor", 2), feature_norm=True,
                     tiling=Tiling(longest_edge=longest, tile=tile), add_special_tokens=True)


def rules(config) -> list[Rule]:
    """How our weights are named in a transformers SmolVLM / Idefics3 model."""
    out = clip.vision_rules(config.vision, "vision", "model.vision_model")
    out.append(rule("projector.fc.weight", "model.connector.modality_projection.proj.weight"))
    for r in llama.rules(config.text):
        theirs = tuple(name.replace("model.", "model.text_model.", 1) for name in r.theirs)
        out.append(rule(tuple(f"lm.{name}" for name in r.ours), theirs, r.transpose))
    return out


def exports(model) -> bool:
    return model.config.projector == "shuffle" and model.config.tiling is not None


def export(model, directory: Path) -> None:
    """Write `model` as a transformers SmolVLMForConditionalGeneration directory."""
    c = model.config
    if c.projector != "shuffle" or c.tiling is None:
        raise RosettaError("only tiled models with a pixel-shuffle projector export as SmolVLM")
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    shapes = {k.replace("model.", "model.text_model.", 1): v for k, v in llama.split_shapes(c.text).items()}
    write_safetensors(to_theirs(rules(c), state, shapes), directory / "model.safetensors")
    vision = clip.export_vision_config(c.vision, siglip=True) | {"model_type": "smolvlm_vision"}
    write_json(directory / "config.json", {
        "architectures": ["SmolVLMForConditionalGeneration"], "model_type": "smolvlm",
        "vision_config": vision, "text_config": llama.export_config(c.text), "image_token_id": c.image_token_id,
        "scale_factor": c.scale_factor, "tie_word_embeddings": c.text.tie_embeddings,
    })
    write_json(directory / "generation_config.json", llama.export_generation_config(c.text))
    write_json(directory / "preprocessor_config.json", {
        "image_processor_type": "SmolVLMImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "do_convert_rgb": True, "do_image_splitting": True, "do_pad": True,
        "size": {"longest_edge": c.tiling.longest_edge}, "max_image_size": {"longest_edge": c.tiling.tile},
        "resample": {name: code for code, name in _RESAMPLE.items()}[c.image.interpolation],
        "rescale_factor": 1 / 255, "image_mean": list(c.image.mean), "image_std": list(c.image.std),
    })
    write_json(directory / "processor_config.json", {"processor_class": "SmolVLMProcessor",
                                                      "image_seq_len": c.image_tokens})
    model.tokenizer.save(directory)
