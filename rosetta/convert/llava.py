"""Hugging Face transformers LlavaForConditionalGeneration checkpoints (LLaVA-1.5 and its kin), both directions.

Their weights come named in three layouts: the hub's checkpoints (llava-hf/llava-1.5-7b-hf) `vision_tower.
vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`; transformers
4.52+ in memory `model.vision_tower.vision_model.*`, `model.language_model.*`, `lm_head.*`; transformers 5 on
disk `vision_tower.embeddings.*` (no `vision_model`). All are read, renamed to the hub's layout, which every
transformers version reads and which is the one written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rosetta.convert import clip, llama
from rosetta.convert.mapping import Rule, linear, rule, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors

NAME = "transformers"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_LAYOUT = [  # (pattern, replacement), in order
    (r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."), (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
]


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") == "llava"


def read(directory: Path):
    from rosetta.models.io import read_weights

    config = read_config(directory)
    return config, _hub_layout(read_weights(directory, WEIGHT_FILES)), rules(config)


def _hub_layout(state: dict) -> dict:
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in _HUB_LAYOUT:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def read_config(directory: Path):
    from rosetta.models.vlm import VLMConfig

    hf = json.loads((directory / "config.json").read_text())
    v = hf.get("vision_config", {})
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise RosettaError(f"{directory}: LLaVA with a {v['model_type']!r} image tower is not supported (CLIP only)")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise RosettaError(f"{directory}: several vision feature layers are not supported")
    generation_file = directory / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    t = {"model_type": "llama", **hf.get("text_config", {})}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if t.get(key) is None and hf.get(key) is not None:
            t[key] = hf[key]
    vision = clip.vision_config(v, siglip=False)
    return VLMConfig(
        vision=vision, text=llama.lm_config(t, generation, directory),
        image=clip.image_config(directory, siglip=False, image_size=vision.image_size),
        image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)), feature_layer=layer,
        keep_class_token=hf.get("vision_feature_select_strategy", "default") == "full",
        projector_act=_projector_act(hf.get("projector_hidden_act", "gelu"), directory),
        projector_bias=hf.get("multimodal_projector_bias", True), add_special_tokens=True,
    )


def _projector_act(name: str, directory: Path) -> str:
    acts = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
    if name not in acts:
        raise RosettaError(f"{directory}: projector activation {name!r} is not supported")
    return acts[name]


def rules(config) -> list[Rule]:
    """How our weights are named in a transformers LlavaForConditionalGeneration (the hub's layout)."""
    out = clip.vision_rules(config.vision, "vision", "vision_tower.vision_model")
    out += linear("projector.fc1", "multi_modal_projector.linear_1", bias=config.projector_bias)
    out += linear("projector.fc2", "multi_modal_projector.linear_2", bias=config.projector_bias)
    for r in llama.rules(config.text):
        theirs = tuple(f"language_model.{name}" for name in r.theirs)
        out.append(rule(tuple(f"lm.{name}" for name in r.ours), theirs, r.transpose))
    return out


def exports(model) -> bool:
    return model.config.projector == "mlp"


def export(model, directory: Path) -> None:
    """Write `model` as a transformers LlavaForConditionalGeneration directory."""
    c = model.config
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    shapes = {f"language_model.{k}": v for k, v in llama.split_shapes(c.text).items()}
    write_safetensors(to_theirs(rules(c), state, shapes), directory / "model.safetensors")
    text = llama.export_config(c.text)
    write_json(directory / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": clip.export_vision_config(c.vision), "text_config": text,
        "image_token_id": c.image_token_id, "image_token_index": c.image_token_id,
        "image_seq_length": c.image_tokens, "vision_feature_layer": c.feature_layer,
        "vision_feature_select_strategy": "full" if c.keep_class_token else "default",
        "projector_hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}.get(c.projector_act,
                                                                                      c.projector_act),
        "multimodal_projector_bias": c.projector_bias, "tie_word_embeddings": c.text.tie_embeddings,
    })
    write_json(directory / "generation_config.json", llama.export_generation_config(c.text))
    write_json(directory / "preprocessor_config.json",
               clip.export_preprocessor(c) | {"image_processor_type": "CLIPImageProcessor"})
    processor = {"processor_class": "LlavaProcessor", "patch_size": c.vision.patch_size,
                 "vision_feature_select_strategy": "full" if c.keep_class_token else "default",
                 "num_additional_image_tokens": int(c.vision.class_token), "image_token": "<image>"}
    write_json(directory / "processor_config.json", processor)
    model.tokenizer.save(directory)
