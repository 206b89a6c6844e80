"""open_clip checkpoints in the layout its `push_to_hf_hub` writes: `open_clip_config.json` + weights.

Covers open_clip's own towers (VisionTransformer + TextTransformer: OpenAI CLIP, LAION, DataComp,
MetaCLIP...). Towers built from timm or HF text models are refused with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rosetta.convert.mapping import Rule, linear, rule
from rosetta.errors import RosettaError
from rosetta.models.config import OPENAI_MEAN, OPENAI_STD, ContrastiveConfig, ImageConfig, TextConfig, VisionConfig

NAME = "open_clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return (directory / CONFIG_FILE).exists()


def read(directory: Path) -> tuple[ContrastiveConfig, dict, list[Rule]]:
    from rosetta.models.io import read_weights

    config = read_config(directory)
    raw = read_weights(directory, WEIGHT_FILES)
    return config, raw, rules(config, set(raw))

_UNSUPPORTED = {
    "timm_model_name": "a timm vision tower",
    "hf_model_name": "a Hugging Face text tower",
    "ls_init_value": "layer scale",
    "attentional_pool": "attentional pooling",
    "embed_cls": "a text class token (CoCa)",
}


def read_config(directory: Path) -> ContrastiveConfig:
    raw = json.loads((directory / CONFIG_FILE).read_text())
    model = raw.get("model_cfg", raw)
    vc: dict[str, Any] = model.get("vision_cfg", {})
    tc: dict[str, Any] = model.get("text_cfg", {})
    for cfg in (vc, tc):
        for key, what in _UNSUPPORTED.items():
            if cfg.get(key):
                raise RosettaError(f"{directory}: this open_clip model uses {what}, which Rosetta does not load yet")
    quick_gelu = bool(model.get("quick_gelu"))
    width = vc.get("width", 768)
    pool = {"tok": "cls", "avg": "mean"}.get(vc.get("pool_type", "tok"))
    if pool is None or (pool == "mean" and vc.get("final_ln_after_pool")):
        raise RosettaError(f"{directory}: open_clip vision pooling {vc.get('pool_type')!r} is not supported")
    vision = VisionConfig(
        image_size=_size(vc.get("image_size", 224)), patch_size=vc.get("patch_size", 16), width=width,
        layers=vc.get("layers", 12), heads=width // vc.get("head_width", 64),
        mlp_dim=int(width * vc.get("mlp_ratio", 4.0)), act=_activation(quick_gelu, vc), norm_eps=_norm_eps(vc),
        class_token=True, pre_norm=not vc.get("no_ln_pre", False), pool=pool,
    )
    text_pool = {"argmax": "eos", "last": "last", "first": "first"}.get(tc.get("pool_type", "argmax"))
    if text_pool is None:
        raise RosettaError(f"{directory}: open_clip text pooling {tc.get('pool_type')!r} is not supported")
    text_width = tc.get("width", 512)
    text = TextConfig(
        vocab_size=tc.get("vocab_size", 49408), context_length=tc.get("context_length", 77), width=text_width,
        layers=tc.get("layers", 12), heads=tc.get("heads", 8), mlp_dim=int(text_width * tc.get("mlp_ratio", 4.0)),
        act=_activation(quick_gelu, tc), norm_eps=_norm_eps(tc), causal=not tc.get("no_causal_mask", False),
        pool=text_pool, eos_token_id=None, pad_token_id=tc.get("pad_id", 0), proj_bias=tc.get("proj_bias", False),
    )
    pre = raw.get("preprocess_cfg", {})
    resize = {"shortest": "shortest", "squash": "squash"}.get(pre.get("resize_mode", "shortest"))
    if resize is None:
        raise RosettaError(f"{directory}: open_clip resize mode {pre.get('resize_mode')!r} is not supported")
    image = ImageConfig(
        resize=resize, interpolation=pre.get("interpolation", "bicubic"),
        mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)), crop_offset="round",
    )
    bias = model.get("init_logit_bias")
    return ContrastiveConfig(
        vision=vision, text=text, image=image, embed_dim=model.get("embed_dim", 512),
        loss="sigmoid" if bias is not None else "softmax", logit_bias_init=bias,
    )


def _activation(quick_gelu: bool, tower: dict[str, Any]) -> str:
    if quick_gelu:
        return "quick_gelu"
    # open_clip passes a tower's act_kwargs to nn.GELU: {"approximate": "tanh"} is the tanh approximation.
    return "gelu_tanh" if (tower.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu"


def _norm_eps(tower: dict[str, Any]) -> float:
    return (tower.get("norm_kwargs") or {}).get("eps", 1e-5)  # open_clip's LayerNorm takes the tower's norm_kwargs


def _size(value: int | list[int]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise RosettaError(f"non-square image size {value} is not supported")
    return value[0]


def _blocks(ours: str, theirs: str, layers: int) -> list[Rule]:
    out: list[Rule] = []
    for i in range(layers):
        o, t = f"{ours}.transformer.blocks.{i}", f"{theirs}.resblocks.{i}"
        out += linear(f"{o}.norm1", f"{t}.ln_1")
        out += [rule(f"{o}.attn.qkv.weight", f"{t}.attn.in_proj_weight"),
                rule(f"{o}.attn.qkv.bias", f"{t}.attn.in_proj_bias")]
        out += linear(f"{o}.attn.out", f"{t}.attn.out_proj")
        out += linear(f"{o}.norm2", f"{t}.ln_2")
        out += linear(f"{o}.mlp.fc1", f"{t}.mlp.c_fc")
        out += linear(f"{o}.mlp.fc2", f"{t}.mlp.c_proj")
    return out


def rules(config: ContrastiveConfig, keys: set[str]) -> list[Rule]:
    out = [
        rule("vision.patch_embed.weight", "visual.conv1.weight"),
        rule("vision.cls_token", "visual.class_embedding"),
        rule("vision.pos_embed", "visual.positional_embedding"),
    ]
    if config.vision.pre_norm:
        out += linear("vision.norm_pre", "visual.ln_pre")
    out += _blocks("vision", "visual.transformer", config.vision.layers)
    out += linear("vision.norm", "visual.ln_post")
    out.append(rule("vision_proj.weight", "visual.proj", transpose=True))
    out += [
        rule("text.token_embed.weight", "token_embedding.weight"),
        rule("text.pos_embed", "positional_embedding"),
    ]
    out += _blocks("text", "transformer", config.text.layers)
    out += linear("text.norm", "ln_final")
    if "text_projection.weight" in keys:  # newer configs project text with an nn.Linear
        out += linear("text_proj", "text_projection", bias=config.text.proj_bias)
    else:
        out.append(rule("text_proj.weight", "text_projection", transpose=True))
    out.append(rule("logit_scale", "logit_scale"))
    if config.logit_bias_init is not None:
        out.append(rule("logit_bias", "logit_bias"))
    return out
