"""Hugging Face transformers ClapModel checkpoints (laion/clap-htsat-unfused, -fused), both directions.

Their query, key and value projections are fused into our qkv; the buffers transformers saves (RoBERTa's
position and token-type ids, Swin's relative position index) are rebuilt from the config, read by no rule,
and written back on export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from rosetta.convert.clip import ACTIVATIONS
from rosetta.convert.mapping import Rule, linear, rule, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors
from rosetta.modalities.clap_features import ClapFeatureConfig
from rosetta.models.clap import ROBERTA_SPECIALS, ClapAudioConfig, ClapConfig, ClapTextConfig

NAME = "transformers"
MODEL_TYPES = ("clap",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TO_HF = {ours: theirs for theirs, ours in ACTIVATIONS.items() if theirs != "gelu_new"}


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") == "clap"


def read(directory: Path) -> tuple[ClapConfig, dict, list[Rule]]:
    from rosetta.models.io import read_weights

    config = read_config(directory)
    return config, read_weights(directory, WEIGHT_FILES), rules(config)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _square(value: int | list[int], what: str) -> int:
    """transformers allows [height, width] for patches; HTSAT's are square."""
    values = value if isinstance(value, list) else [value, value]
    if len(set(values)) != 1:
        raise RosettaError(f"non-square {what} {value} is not supported")
    return values[0]


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise RosettaError(f"activation {name!r} is not supported")
    return ACTIVATIONS[name]


def read_config(directory: Path) -> ClapConfig:
    """Our config for a transformers ClapModel directory (config.json and the feature extractor's settings)."""
    hf = _json(directory / "config.json")
    a, t = hf.get("audio_config", {}), hf.get("text_config", {})
    if hf.get("projection_hidden_act", "relu") != "relu":
        raise RosettaError(f"{directory}: projection activation {hf['projection_hidden_act']!r} is not supported")
    if a.get("enable_fusion") and a.get("fusion_type") == "channel_map":
        raise RosettaError(f"{directory}: fusion type 'channel_map' is not supported (CLAP's checkpoints use AFF)")
    if t.get("type_vocab_size", 1) != 1:
        raise RosettaError(f"{directory}: a text tower with several token types is not CLAP's")
    audio = ClapAudioConfig(
        n_mels=a.get("num_mel_bins", 64), spec_size=a.get("spec_size", 256),
        patch_size=_square(a.get("patch_size", 4), "patch size"),
        patch_stride=_square(a.get("patch_stride", [4, 4]), "patch stride"),
        width=a.get("patch_embeds_hidden_size", 96), depths=tuple(a.get("depths", (2, 2, 6, 2))),
        heads=tuple(a.get("num_attention_heads", (4, 8, 16, 32))), window_size=a.get("window_size", 8),
        mlp_ratio=a.get("mlp_ratio", 4.0), qkv_bias=a.get("qkv_bias", True),
        act=_activation(a.get("hidden_act", "gelu")), norm_eps=a.get("layer_norm_eps", 1e-5),
        patch_norm=a.get("enable_patch_layer_norm", True), fusion=a.get("enable_fusion", False),
        fusion_ratio=a.get("aff_block_r", 4),
    )
    if a.get("hidden_size", audio.out_width) != audio.out_width:
        raise RosettaError(f"{directory}: audio hidden_size {a['hidden_size']} is not the last stage's width "
                           f"{audio.out_width}")
    text = ClapTextConfig(
        vocab_size=t.get("vocab_size", 50265), width=t.get("hidden_size", 768), layers=t.get("num_hidden_layers", 12),
        heads=t.get("num_attention_heads", 12), mlp_dim=t.get("intermediate_size", 3072),
        act=_activation(t.get("hidden_act", "gelu")), max_positions=t.get("max_position_embeddings", 514),
        norm_eps=t.get("layer_norm_eps", 1e-12), pad_token_id=t.get("pad_token_id", 1),
    )
    return ClapConfig(audio=audio, text=text, features=feature_config(directory, audio.fusion),
                      embed_dim=hf.get("projection_dim", 512),
                      logit_scale_init=math.log(hf.get("logit_scale_init_value", 1 / 0.07)))


def feature_config(directory: Path, fusion: bool) -> ClapFeatureConfig:
    """The feature extractor's settings: preprocessor_config.json, or (transformers 5, which saves a processor's
    parts together) the "feature_extractor" of processor_config.json; without either, LAION's."""
    p = _json(directory / "preprocessor_config.json") or _json(directory / "processor_config.json").get(
        "feature_extractor", {})
    return ClapFeatureConfig(
        sampling_rate=p.get("sampling_rate", 48_000), n_mels=p.get("feature_size", 64),
        n_fft=p.get("fft_window_size", 1024), hop_length=p.get("hop_length", 480),
        max_seconds=p.get("max_length_s", 10), f_min=p.get("frequency_min", 50), f_max=p.get("frequency_max", 14_000),
        truncation=p.get("truncation", "fusion" if fusion else "rand_trunc"), padding=p.get("padding", "repeatpad"),
    )


def _batch_norm(ours: str, theirs: str) -> list[Rule]:
    return linear(ours, theirs) + [rule(f"{ours}.{name}", f"{theirs}.{name}")
                                   for name in ("running_mean", "running_var", "num_batches_tracked")]


def _attention(ours: str, theirs: str) -> list[Rule]:
    """Their separate query, key and value projections (and output) as our fused qkv (and out)."""
    return (linear(f"{ours}.qkv", tuple(f"{theirs}.self.{p}" for p in ("query", "key", "value")))
            + linear(f"{ours}.out", f"{theirs}.output.dense"))


def audio_rules(c: ClapAudioConfig) -> list[Rule]:
    e = "audio_model.audio_encoder"
    out = _batch_norm("audio.mel_norm", f"{e}.batch_norm") + linear("audio.patch_embed", f"{e}.patch_embed.proj")
    if c.patch_norm:
        out += linear("audio.patch_norm", f"{e}.patch_embed.norm")
    if c.fusion:
        out += linear("audio.crop_embed", f"{e}.patch_embed.mel_conv2d")
        fusion = f"{e}.patch_embed.fusion_model"
        for branch, first in (("local_att", 0), ("global_att", 1)):  # the global branch starts with its pooling
            o, t = f"audio.fusion.{branch}", f"{fusion}.{branch}"
            out += linear(f"{o}.{first}", f"{t}.{first}") + _batch_norm(f"{o}.{first + 1}", f"{t}.{first + 1}")
            out += linear(f"{o}.{first + 3}", f"{t}.{first + 3}") + _batch_norm(f"{o}.{first + 4}", f"{t}.{first + 4}")
    for s, depth in enumerate(c.depths):
        for i in range(depth):
            o, t = f"audio.stages.{s}.blocks.{i}", f"{e}.layers.{s}.blocks.{i}"
            out += linear(f"{o}.norm1", f"{t}.layernorm_before") + _attention(f"{o}.attn", f"{t}.attention")
            out.append(rule(f"{o}.relative_position_bias", f"{t}.attention.self.relative_position_bias_table"))
            out += linear(f"{o}.norm2", f"{t}.layernorm_after")
            out += linear(f"{o}.mlp.fc1", f"{t}.intermediate.dense") + linear(f"{o}.mlp.fc2", f"{t}.output.dense")
        if s < len(c.depths) - 1:
            o, t = f"audio.stages.{s}.merge", f"{e}.layers.{s}.downsample"
            out += linear(f"{o}.norm", f"{t}.norm") + linear(f"{o}.reduction", f"{t}.reduction", bias=False)
    out += linear("audio.norm", f"{e}.norm")
    return out


def text_rules(c: ClapTextConfig) -> list[Rule]:
    t = "text_model"
    out = [
        rule("text.token_embed.weight", f"{t}.embeddings.word_embeddings.weight"),
        rule("text.pos_embed.weight", f"{t}.embeddings.position_embeddings.weight"),
        rule("text.type_embed", f"{t}.embeddings.token_type_embeddings.weight"),
    ]
    out += linear("text.embed_norm", f"{t}.embeddings.LayerNorm")
    for i in range(c.layers):
        o, layer = f"text.blocks.{i}", f"{t}.encoder.layer.{i}"
        out += _attention(f"{o}.attn", f"{layer}.attention")
        out += linear(f"{o}.norm1", f"{layer}.attention.output.LayerNorm")
        out += linear(f"{o}.mlp.fc1", f"{layer}.intermediate.dense") + linear(f"{o}.mlp.fc2", f"{layer}.output.dense")
        out += linear(f"{o}.norm2", f"{layer}.output.LayerNorm")
    out += linear("text.pool", f"{t}.pooler.dense")
    return out


def rules(config: ClapConfig) -> list[Rule]:
    """How our weights are named in a transformers ClapModel."""
    out = audio_rules(config.audio) + text_rules(config.text)
    for ours, theirs in (("audio_proj", "audio_projection"), ("text_proj", "text_projection")):
        out += linear(f"{ours}.linear1", f"{theirs}.linear1") + linear(f"{ours}.linear2", f"{theirs}.linear2")
    return out + [rule("logit_scale_audio", "logit_scale_a"), rule("logit_scale_text", "logit_scale_t")]


def export(model, directory: Path) -> None:
    """Write `model` as a transformers ClapModel directory (weights, config, feature extractor, tokenizer)."""
    c = model.config
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    scalars = {"logit_scale_a": (), "logit_scale_t": (),  # scalars in ClapModel, [1] here
               "text_model.embeddings.token_type_embeddings.weight": (1, c.text.width)}
    rules_ = rules(c)
    scalars |= {t: () for r in rules_ for t in r.theirs if t.endswith("num_batches_tracked")}
    theirs = to_theirs(rules_, state, shapes=scalars) | _buffers(model)
    write_safetensors(theirs, directory / "model.safetensors")
    token = model.tokenizer.backend.token_to_id
    write_json(directory / "config.json", export_config(c, bos_token_id=token("<s>"), eos_token_id=token("</s>")))
    write_json(directory / "preprocessor_config.json", export_features(c.features))
    bos, pad, eos, unk = ROBERTA_SPECIALS
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.text.context_length,
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
    })
    model.tokenizer.save(directory)


def _buffers(model) -> dict[str, torch.Tensor]:
    """The index buffers transformers saves with the weights."""
    out = {"text_model.embeddings.position_ids": torch.arange(model.config.text.max_positions)[None]}
    out["text_model.embeddings.token_type_ids"] = torch.zeros_like(out["text_model.embeddings.position_ids"])
    for s, stage in enumerate(model.audio.stages):
        for i, block in enumerate(stage.blocks):
            name = f"audio_model.audio_encoder.layers.{s}.blocks.{i}.attention.self.relative_position_index"
            out[name] = block.relative_index.cpu()
    return out


def export_config(c: ClapConfig, bos_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
    a, t = c.audio, c.text
    return {
        "architectures": ["ClapModel"], "model_type": "clap", "projection_dim": c.embed_dim,
        "projection_hidden_act": "relu", "logit_scale_init_value": math.exp(c.logit_scale_init),
        "audio_config": {
            "model_type": "clap_audio_model", "num_mel_bins": a.n_mels, "spec_size": a.spec_size,
            "patch_size": a.patch_size, "patch_stride": [a.patch_stride, a.patch_stride],
            "patch_embeds_hidden_size": a.width, "hidden_size": a.out_width, "depths": list(a.depths),
            "num_attention_heads": list(a.heads), "window_size": a.window_size, "mlp_ratio": a.mlp_ratio,
            "qkv_bias": a.qkv_bias, "hidden_act": _TO_HF[a.act], "layer_norm_eps": a.norm_eps,
            "enable_patch_layer_norm": a.patch_norm, "enable_fusion": a.fusion, "fusion_type": None,
            "aff_block_r": a.fusion_ratio, "projection_dim": c.embed_dim,
        },
        "text_config": {
            "model_type": "clap_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "intermediate_size": t.mlp_dim,
            "hidden_act": _TO_HF[t.act], "max_position_embeddings": t.max_positions, "type_vocab_size": 1,
            "layer_norm_eps": t.norm_eps, "pad_token_id": t.pad_token_id, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "projection_dim": c.embed_dim,
        },
    }


def export_features(f: ClapFeatureConfig) -> dict[str, Any]:
    return {
        "feature_extractor_type": "ClapFeatureExtractor", "sampling_rate": f.sampling_rate, "feature_size": f.n_mels,
        "fft_window_size": f.n_fft, "hop_length": f.hop_length, "max_length_s": f.max_seconds,
        "frequency_min": f.f_min, "frequency_max": f.f_max, "truncation": f.truncation, "padding": f.padding,
        "padding_value": 0.0, "return_attention_mask": False,
    }
