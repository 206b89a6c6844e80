"""Hugging Face transformers Whisper checkpoints (WhisperForConditionalGeneration), both directions.

Whisper's key projections have no bias; ours are fused with the query and value projections, which do,
so the key's share of the fused bias is zeros (added on reading, checked and dropped on export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rosetta.convert.mapping import Rule, linear, rule, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors
from rosetta.models.asr import ASRConfig

NAME = "transformers"
MODEL_TYPES = {"whisper": "WhisperForConditionalGeneration"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") == "whisper"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def read_config(directory: Path) -> ASRConfig:
    hf = _json(directory / "config.json")
    if hf.get("encoder_ffn_dim") != hf.get("decoder_ffn_dim"):
        raise RosettaError(f"{directory}: encoder and decoder MLPs of different widths are not supported")
    if hf.get("activation_function", "gelu") != "gelu" or hf.get("scale_embedding"):
        raise RosettaError(f"{directory}: not Whisper's architecture (activation, embedding scale)")
    generation = _json(directory / "generation_config.json")
    vocab = hf["vocab_size"]
    return ASRConfig(
        n_mels=hf.get("num_mel_bins", 80), audio_context=hf.get("max_source_positions", 1500), width=hf["d_model"],
        encoder_layers=hf["encoder_layers"], encoder_heads=hf["encoder_attention_heads"],
        decoder_layers=hf["decoder_layers"], decoder_heads=hf["decoder_attention_heads"],
        mlp_dim=hf["encoder_ffn_dim"], vocab_size=vocab, text_context=hf.get("max_target_positions", 448),
        multilingual=generation.get("is_multilingual", vocab >= 51865),
        alignment_heads=tuple(tuple(h) for h in generation.get("alignment_heads") or ()),
        suppress_tokens=tuple(generation.get("suppress_tokens") or hf.get("suppress_tokens") or ()),
        begin_suppress_tokens=tuple(generation.get("begin_suppress_tokens") or hf.get("begin_suppress_tokens") or ()),
    )


def read(directory: Path) -> tuple[ASRConfig, dict, list[Rule]]:
    from rosetta.models.io import read_weights

    config = read_config(directory)
    theirs = read_weights(directory, WEIGHT_FILES)
    for key in _key_projections(config):  # no bias in Whisper: zeros in our fused one
        theirs[f"{key}.bias"] = torch.zeros(config.width, dtype=theirs[f"{key}.weight"].dtype)
    return config, theirs, rules(config)


def _key_projections(config: ASRConfig) -> list[str]:
    encoder = [f"model.encoder.layers.{i}.self_attn.k_proj" for i in range(config.encoder_layers)]
    decoder = [f"model.decoder.layers.{i}.{a}.k_proj" for i in range(config.decoder_layers)
               for a in ("self_attn", "encoder_attn")]
    return encoder + decoder


def _attention(ours: str, theirs: str) -> list[Rule]:
    return linear(f"{ours}.qkv", tuple(f"{theirs}.{p}_proj" for p in "qkv")) + linear(f"{ours}.out",
                                                                                     f"{theirs}.out_proj")


def rules(config: ASRConfig) -> list[Rule]:
    e, d = "model.encoder", "model.decoder"
    out = linear("encoder.conv1", f"{e}.conv1") + linear("encoder.conv2", f"{e}.conv2")
    out.append(rule("encoder.pos_embed", f"{e}.embed_positions.weight"))
    for i in range(config.encoder_layers):
        o, t = f"encoder.transformer.blocks.{i}", f"{e}.layers.{i}"
        out += linear(f"{o}.norm1", f"{t}.self_attn_layer_norm")
        out += _attention(f"{o}.attn", f"{t}.self_attn")
        out += linear(f"{o}.norm2", f"{t}.final_layer_norm")
        out += linear(f"{o}.mlp.fc1", f"{t}.fc1") + linear(f"{o}.mlp.fc2", f"{t}.fc2")
    out += linear("encoder.norm", f"{e}.layer_norm")
    out += [rule("embed.weight", f"{d}.embed_tokens.weight"), rule("pos_embed", f"{d}.embed_positions.weight")]
    for i in range(config.decoder_layers):
        o, t = f"blocks.{i}", f"{d}.layers.{i}"
        out += linear(f"{o}.attn_norm", f"{t}.self_attn_layer_norm")
        out += _attention(f"{o}.attn", f"{t}.self_attn")
        out += linear(f"{o}.cross_norm", f"{t}.encoder_attn_layer_norm")
        out += linear(f"{o}.cross.q", f"{t}.encoder_attn.q_proj")
        out += linear(f"{o}.cross.kv", (f"{t}.encoder_attn.k_proj", f"{t}.encoder_attn.v_proj"))
        out += linear(f"{o}.cross.out", f"{t}.encoder_attn.out_proj")
        out += linear(f"{o}.mlp_norm", f"{t}.final_layer_norm")
        out += linear(f"{o}.mlp.fc1", f"{t}.fc1") + linear(f"{o}.mlp.fc2", f"{t}.fc2")
    out += linear("norm", f"{d}.layer_norm")
    return out


def export(model, directory: Path) -> None:
    """Write `model` as a transformers WhisperForConditionalGeneration directory."""
    c = model.config
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    theirs = to_theirs(rules(c), state)
    for key in _key_projections(c):
        bias = theirs.pop(f"{key}.bias")
        if bias.abs().max() > 0:
            raise RosettaError(f"{key}: Whisper's key projections have no bias, and this model's is not zero")
    write_safetensors(theirs, directory / "model.safetensors")
    tokens = model.tokens
    write_json(directory / "config.json", {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
        "d_model": c.width, "encoder_layers": c.encoder_layers, "encoder_attention_heads": c.encoder_heads,
        "decoder_layers": c.decoder_layers, "decoder_attention_heads": c.decoder_heads,
        "encoder_ffn_dim": c.mlp_dim, "decoder_ffn_dim": c.mlp_dim, "vocab_size": c.vocab_size,
        "num_mel_bins": c.n_mels, "max_source_positions": c.audio_context, "max_target_positions": c.text_context,
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "bos_token_id": tokens.eot, "eos_token_id": tokens.eot, "pad_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
    })
    generation: dict[str, Any] = {
        "decoder_start_token_id": tokens.sot, "eos_token_id": tokens.eot, "pad_token_id": tokens.eot,
        "is_multilingual": c.multilingual, "no_timestamps_token_id": tokens.no_timestamps,
        "suppress_tokens": list(c.suppress_tokens), "begin_suppress_tokens": list(c.begin_suppress_tokens),
        "alignment_heads": [list(h) for h in c.alignment_heads], "max_length": c.text_context,
    }
    if c.multilingual:
        generation |= {"lang_to_id": {f"<|{code}|>": i for code, i in tokens.languages.items()},
                       "task_to_id": {"transcribe": tokens.transcribe, "translate": tokens.translate}}
    write_json(directory / "generation_config.json", generation)
    model.tokenizer.save(directory)
