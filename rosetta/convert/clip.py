"""Hugging Face transformers checkpoints: CLIPModel and SiglipModel, both directions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rosetta.convert.mapping import Rule, linear, rule, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors
from rosetta.models.config import (
    HALF,
    OPENAI_MEAN,
    OPENAI_STD,
    ContrastiveConfig,
    ImageConfig,
    TextConfig,
    VisionConfig,
)

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's codes


NAME = "transformers"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") in ("clip", "siglip")


def read(directory: Path) -> tuple[ContrastiveConfig, dict, list[Rule]]:
    from rosetta.models.io import read_weights

    config = read_config(directory)
    return config, read_weights(directory, WEIGHT_FILES), rules(config)


def export(model, directory: Path) -> None:
    """Write `model` as a transformers CLIPModel or SiglipModel directory (weights, config, preprocessor,
    tokenizer), whichever architecture it has."""
    siglip = model.config.vision.pool == "map"
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if siglip:
        config = export_siglip_config(model.config)
        theirs = to_theirs(rules(model.config), state, shapes={})
    else:
        config = export_config(model.config, model.tokenizer.backend)
        theirs = to_theirs(rules(model.config), state, shapes={"logit_scale": ()})  # a scalar in CLIPModel
    write_safetensors(theirs, directory / "model.safetensors")
    write_json(directory / "config.json", config)
    write_json(directory / "preprocessor_config.json", export_preprocessor(model.config))
    write_json(directory / "tokenizer_config.json", _tokenizer_config(model, siglip))
    model.tokenizer.save(directory)


def _clip_special_ids(backend) -> tuple[int, int]:
    from rosetta.modalities.text import BOS, EOS

    bos, eos = backend.token_to_id(BOS), backend.token_to_id(EOS)
    if bos is None or eos is None:
        raise RosettaError("exporting to transformers needs a tokenizer with start- and end-of-text tokens")
    return eos, bos


def _tokenizer_config(model, siglip: bool) -> dict[str, Any]:
    """transformers' CLIPTokenizer rebuilds CLIP's BPE from tokenizer.json; any other tokenizer (SigLIP's
    SentencePiece as a `tokenizers` Unigram, the byte-level one of models trained from scratch) loads as written."""
    from rosetta.modalities.text import BOS, EOS

    length = model.config.text.context_length
    backend = model.tokenizer.backend
    if siglip:
        pad = backend.id_to_token(model.config.text.pad_token_id)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": length,
                "eos_token": "</s>", "pad_token": pad, "unk_token": backend.id_to_token(0)}
    clip = getattr(backend.model, "end_of_word_suffix", None) == "</w>"
    return {"tokenizer_class": "CLIPTokenizer" if clip else "PreTrainedTokenizerFast", "model_max_length": length,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise RosettaError(f"activation {name!r} is not supported")
    return ACTIVATIONS[name]


def read_config(directory: Path) -> ContrastiveConfig:
    """Our config for a transformers CLIP or SigLIP directory."""
    hf = json.loads((directory / "config.json").read_text())
    kind = hf.get("model_type")
    if kind not in ("clip", "siglip"):
        raise RosettaError(f"{directory}: transformers model type {kind!r} is not a CLIP or SigLIP model")
    siglip = kind == "siglip"
    vision = vision_config(hf.get("vision_config", {}), siglip)
    defaults = _SIGLIP_DEFAULTS if siglip else _CLIP_DEFAULTS
    t = {**defaults["text"], **hf.get("text_config", {})}
    eos = t.get("eos_token_id")
    text = TextConfig(
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], width=t["hidden_size"],
        layers=t["num_hidden_layers"], heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
        act=_activation(t["hidden_act"]), norm_eps=t["layer_norm_eps"], causal=not siglip,
        pool="last" if siglip else "eos",
        # transformers treats eos_token_id == 2 as "legacy": pool at the highest token id.
        eos_token_id=None if (not siglip and eos == 2) else eos,
        pad_token_id=t.get("pad_token_id") if t.get("pad_token_id") is not None else (1 if siglip else 0),
        proj_bias=siglip, cleaning="siglip" if siglip else "clip",
    )
    embed_dim = (t.get("projection_size") or t["hidden_size"]) if siglip else hf.get("projection_dim", 512)
    config = ContrastiveConfig(
        vision=vision, text=text, image=image_config(directory, siglip, vision.image_size), embed_dim=embed_dim,
        vision_proj=not siglip, loss="sigmoid" if siglip else "softmax",
        logit_scale_init=math.log(10) if siglip else hf.get("logit_scale_init_value", 2.6592),
        logit_bias_init=-10.0 if siglip else None,
    )
    return config


def vision_config(v: dict[str, Any], siglip: bool) -> VisionConfig:
    """Our config of a transformers CLIPVisionConfig or SiglipVisionConfig (a dict, unset keys at their defaults)."""
    v = {**(_SIGLIP_DEFAULTS if siglip else _CLIP_DEFAULTS)["vision"], **v}
    return VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        act=_activation(v["hidden_act"]), norm_eps=v["layer_norm_eps"],
        class_token=not siglip, pre_norm=not siglip, patch_bias=siglip, pool="map" if siglip else "cls",
    )


_CLIP_DEFAULTS = {
    "vision": dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "text": dict(vocab_size=49408, max_position_embeddings=77, hidden_size=512, num_hidden_layers=12,
                 num_attention_heads=8, intermediate_size=2048, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407, pad_token_id=1),
}
_SIGLIP_DEFAULTS = {
    "vision": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "text": dict(vocab_size=32000, max_position_embeddings=64, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_pytorch_tanh",
                 layer_norm_eps=1e-6, eos_token_id=1, pad_token_id=1),
}


def preprocessor_settings(directory: Path) -> dict[str, Any]:
    """The image processor's settings: preprocessor_config.json, or (transformers 5, which saves a processor's
    parts together) the "image_processor" of processor_config.json; {} without either."""
    path = directory / "preprocessor_config.json"
    if path.exists():
        return json.loads(path.read_text())
    path = directory / "processor_config.json"
    return json.loads(path.read_text()).get("image_processor", {}) if path.exists() else {}


def image_config(directory: Path, siglip: bool, image_size: int | None = None) -> ImageConfig:
    """The preprocessing a transformers image processor's settings ask for. `image_size` is the model's: a resize
    to another size (CLIP's 256-then-crop-224 recipes) is kept as `resize_size`."""
    p = preprocessor_settings(directory)
    size = p.get("size")
    # {"height", "width"} squashes, {"shortest_edge"} resizes and crops; absent or a bare int: the family's default.
    squash = "height" in size if isinstance(size, dict) and size else siglip
    target = (size.get("height") if squash else size.get("shortest_edge")) if isinstance(size, dict) else None
    center_crop = bool(p.get("do_center_crop", not squash))
    crop = p.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if center_crop and crop and image_size and crop != image_size:
        raise RosettaError(f"{directory}: the image processor crops {crop} px, the model takes {image_size}")
    if not center_crop and not (squash and target in (None, image_size)) and image_size:
        raise RosettaError(f"{directory}: the image processor neither crops nor squashes to the model's {image_size} "
                           "px: its pixels would not fit the image tower")
    normalize = p.get("do_normalize", True)
    resample = p.get("resample")
    return ImageConfig(
        resize="squash" if squash else "shortest",
        interpolation=_RESAMPLE.get(resample if isinstance(resample, int) else 3, "bicubic"),
        mean=tuple(p.get("image_mean", HALF if siglip else OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=tuple(p.get("image_std", HALF if siglip else OPENAI_STD)) if normalize else (1.0, 1.0, 1.0),
        resize_size=target if target and target != image_size else None,
        center_crop=center_crop,
        rescale=float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0,
    )


def _encoder_rules(ours: str, theirs: str, layers: int) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(layers):
        o, t = f"{ours}.transformer.blocks.{i}", f"{theirs}.encoder.layers.{i}"
        rules += linear(f"{o}.norm1", f"{t}.layer_norm1")
        rules += linear(f"{o}.attn.qkv", (f"{t}.self_attn.q_proj", f"{t}.self_attn.k_proj", f"{t}.self_attn.v_proj"))
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.out_proj")
        rules += linear(f"{o}.norm2", f"{t}.layer_norm2")
        rules += linear(f"{o}.mlp.fc1", f"{t}.mlp.fc1")
        rules += linear(f"{o}.mlp.fc2", f"{t}.mlp.fc2")
    return rules


def vision_rules(vision: VisionConfig, ours: str = "vision", theirs: str = "vision_model") -> list[Rule]:
    """How our image tower is named in a transformers CLIP or SigLIP vision model."""
    o, v = ours, theirs
    out = [rule(f"{o}.patch_embed.weight", f"{v}.embeddings.patch_embedding.weight")]
    if vision.patch_bias:
        out.append(rule(f"{o}.patch_embed.bias", f"{v}.embeddings.patch_embedding.bias"))
    if vision.class_token:
        out.append(rule(f"{o}.cls_token", f"{v}.embeddings.class_embedding"))
    out.append(rule(f"{o}.pos_embed", f"{v}.embeddings.position_embedding.weight"))
    if vision.pre_norm:
        out += linear(f"{o}.norm_pre", f"{v}.pre_layrnorm")
    out += _encoder_rules(o, v, vision.layers)
    out += linear(f"{o}.norm", f"{v}.post_layernorm")
    if vision.pool == "map":
        head = f"{v}.head"
        out += [
            rule(f"{o}.pool.probe", f"{head}.probe"),
            rule((f"{o}.pool.attn.q.weight", f"{o}.pool.attn.kv.weight"), f"{head}.attention.in_proj_weight"),
            rule((f"{o}.pool.attn.q.bias", f"{o}.pool.attn.kv.bias"), f"{head}.attention.in_proj_bias"),
        ]
        out += linear(f"{o}.pool.attn.out", f"{head}.attention.out_proj")
        out += linear(f"{o}.pool.norm", f"{head}.layernorm")
        out += linear(f"{o}.pool.mlp.fc1", f"{head}.mlp.fc1")
        out += linear(f"{o}.pool.mlp.fc2", f"{head}.mlp.fc2")
    return out


def rules(config: ContrastiveConfig) -> list[Rule]:
    """How our weights are named in a transformers CLIPModel (class token) or SiglipModel (attention pool)."""
    siglip = config.vision.pool == "map"
    t = "text_model"
    out = vision_rules(config.vision)
    if config.vision_proj:
        out.append(rule("vision_proj.weight", "visual_projection.weight"))
    out += [
        rule("text.token_embed.weight", f"{t}.embeddings.token_embedding.weight"),
        rule("text.pos_embed", f"{t}.embeddings.position_embedding.weight"),
    ]
    out += _encoder_rules("text", t, config.text.layers)
    out += linear("text.norm", f"{t}.final_layer_norm")
    out += linear("text_proj", f"{t}.head" if siglip else "text_projection", bias=config.text.proj_bias)
    out.append(rule("logit_scale", "logit_scale"))
    if config.logit_bias_init is not None:
        out.append(rule("logit_bias", "logit_bias"))
    return out


def export_config(config: ContrastiveConfig, backend) -> dict[str, Any]:
    """A transformers CLIPConfig for a model of CLIP's architecture and its tokenizer's `backend`."""
    v, t = config.vision, config.text
    compatible = (
        v.stem == "patch" and v.pool == "cls" and v.class_token and v.pre_norm and not v.patch_bias
        and config.vision_proj and t.causal and t.pool == "eos" and not t.proj_bias and config.loss == "softmax"
    )
    if not compatible:
        raise RosettaError("only models of CLIP's architecture (or SigLIP's) can be exported to transformers")
    eos_token_id, bos_token_id = _clip_special_ids(backend)
    to_hf = {ours: theirs for theirs, ours in ACTIVATIONS.items() if theirs != "gelu_new"}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "text_config": {
            "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length, "hidden_size": t.width,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "intermediate_size": t.mlp_dim,
            "hidden_act": to_hf[t.act], "layer_norm_eps": t.norm_eps, "projection_dim": config.embed_dim,
            "eos_token_id": eos_token_id, "bos_token_id": bos_token_id, "pad_token_id": t.pad_token_id,
        },
        "vision_config": export_vision_config(v) | {"projection_dim": config.embed_dim},
    }


def export_siglip_config(config: ContrastiveConfig) -> dict[str, Any]:
    """A transformers SiglipConfig for a model of SigLIP's architecture."""
    v, t = config.vision, config.text
    compatible = (
        v.pool == "map" and not config.vision_proj and not t.causal and t.pool == "last" and t.proj_bias
        and config.loss == "sigmoid" and config.logit_bias_init is not None and v.width == config.embed_dim
    )
    if not compatible:
        raise RosettaError("only models of SigLIP's architecture can be exported to transformers' SiglipModel")
    to_hf = {ours: theirs for theirs, ours in ACTIVATIONS.items() if theirs != "gelu_new"}
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {
            "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length, "hidden_size": t.width,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "intermediate_size": t.mlp_dim,
            "hidden_act": to_hf[t.act], "layer_norm_eps": t.norm_eps, "projection_size": config.embed_dim,
            "pad_token_id": t.pad_token_id, **({"eos_token_id": t.eos_token_id} if t.eos_token_id is not None else {}),
        },
        "vision_config": export_vision_config(v, siglip=True),
    }


def export_vision_config(v: VisionConfig, siglip: bool = False) -> dict[str, Any]:
    """A transformers CLIPVisionConfig (or SiglipVisionConfig) for an image tower of that architecture."""
    if v.stem != "patch" or (v.class_token, v.pre_norm, v.patch_bias) != (not siglip, not siglip, siglip):
        raise RosettaError(f"only image towers of {'SigLIP' if siglip else 'CLIP'}'s architecture export to it")
    to_hf = {ours: theirs for theirs, ours in ACTIVATIONS.items() if theirs != "gelu_new"}
    return {
        "model_type": "siglip_vision_model" if siglip else "clip_vision_model",
        "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_size": v.width, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
        "intermediate_size": v.mlp_dim, "hidden_act": to_hf[v.act], "layer_norm_eps": v.norm_eps,
    }


def export_preprocessor(config: ContrastiveConfig) -> dict[str, Any]:
    size = config.vision.image_size
    resized = config.image.resize_size or size
    squash = config.image.resize == "squash"
    if config.vision.pool == "map" and squash and resized == size:
        return {  # SigLIP's own processor: it squashes and never crops
            "image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size},
            "resample": {name: code for code, name in _RESAMPLE.items()}[config.image.interpolation],
            "do_rescale": True, "rescale_factor": config.image.rescale, "do_normalize": True,
            "image_mean": list(config.image.mean), "image_std": list(config.image.std), "do_convert_rgb": True,
        }
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": resized, "width": resized} if squash else {"shortest_edge": resized},
        "do_center_crop": config.image.center_crop and not (squash and resized == size),
        "crop_size": {"height": size, "width": size},
        "resample": {name: code for code, name in _RESAMPLE.items()}[config.image.interpolation],
        "do_rescale": True,
        "rescale_factor": config.image.rescale,
        "do_normalize": True,
        "image_mean": list(config.image.mean),
        "image_std": list(config.image.std),
        "do_convert_rgb": True,
    }
