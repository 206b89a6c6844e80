"""Hugging Face transformers causal language models of the Llama family — LlamaForCausalLM (Llama 3, SmolLM2),
Qwen2ForCausalLM (Qwen2.5) and MistralForCausalLM — both directions.

Configs are read in transformers 5's form (`rope_parameters`) and the older one (`rope_theta` +
`rope_scaling`); the generation defaults and end-of-sequence ids come from `generation_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rosetta.convert.mapping import Rule, linear, rule, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors
from rosetta.generation.sampling import SamplingParams
from rosetta.models.lm import LMConfig
from rosetta.nn.decoder import RopeScaling

NAME = "transformers"
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") in MODEL_TYPES


def read(directory: Path) -> tuple[LMConfig, dict, list[Rule]]:
    from rosetta.models.io import read_weights

    config = read_config(directory)
    return config, read_weights(directory, WEIGHT_FILES), rules(config)


def export(model, directory: Path) -> None:
    """Write `model` as a transformers *ForCausalLM directory: weights, config, generation config, tokenizer."""
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    write_safetensors(to_theirs(rules(model.config), state, split_shapes(model.config)),
                      directory / "model.safetensors")
    write_json(directory / "config.json", export_config(model.config))
    write_json(directory / "generation_config.json", export_generation_config(model.config))
    model.tokenizer.save(directory)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _rope(hf: dict[str, Any], source: Path) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                           **(hf.get("rope_scaling") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_context=int(params["original_max_position_embeddings"]),
        )
    raise RosettaError(f"{source}: rotary scaling {kind!r} is not supported (Rosetta reads default, linear, llama3)")


def _sampling(generation: dict[str, Any]) -> SamplingParams:
    """transformers' defaults for what generation_config.json leaves out: greedy unless do_sample, then top_k 50."""
    if not generation.get("do_sample"):
        return SamplingParams(repetition_penalty=float(generation.get("repetition_penalty") or 1.0))
    return SamplingParams(
        temperature=float(generation.get("temperature", 1.0)), top_k=int(generation.get("top_k", 50) or 0),
        top_p=float(generation.get("top_p", 1.0)), min_p=float(generation.get("min_p") or 0.0),
        repetition_penalty=float(generation.get("repetition_penalty") or 1.0),
    )


def read_config(directory: Path) -> LMConfig:
    return lm_config(_json(directory / "config.json"), _json(directory / "generation_config.json"), directory)


def lm_config(hf: dict[str, Any], generation: dict[str, Any], directory: Path) -> LMConfig:
    """Our config of a transformers Llama, Qwen2 or Mistral config (and its generation config)."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise RosettaError(f"{directory}: model type {kind!r} is not a causal LM Rosetta reads "
                           f"({', '.join(MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise RosettaError(f"{directory}: activation {hf['hidden_act']!r} is not supported "
                           "(Llama-family models use silu)")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise RosettaError(f"{directory}: Qwen2's per-layer sliding window is not supported")
    theta, scaling = _rope(hf, directory)
    bias = bool(hf.get("attention_bias", False)) if kind == "llama" else False
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    return LMConfig(
        vocab_size=hf["vocab_size"], width=width, layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or width // heads,
        mlp_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=scaling, context_length=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if kind == "qwen2" else bias, out_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if kind == "llama" else False,
        sliding_window=hf.get("sliding_window") if kind == "mistral" else None,
        bos_token_id=generation.get("bos_token_id", hf.get("bos_token_id")),
        eos_token_ids=_ids(generation.get("eos_token_id", hf.get("eos_token_id"))),
        pad_token_id=generation.get("pad_token_id", hf.get("pad_token_id")),
        architecture=kind, sampling=_sampling(generation),
    )


def rules(config: LMConfig) -> list[Rule]:
    """How our weights are named in a transformers *ForCausalLM."""
    out = [rule("embed.weight", "model.embed_tokens.weight")]
    for i in range(config.layers):
        o, t = f"blocks.{i}", f"model.layers.{i}"
        attn = tuple(f"{t}.self_attn.{p}_proj" for p in "qkv")
        out += linear(f"{o}.attn_norm", f"{t}.input_layernorm", bias=False)
        out += linear(f"{o}.attn.qkv", attn, bias=config.qkv_bias)
        out += linear(f"{o}.attn.out", f"{t}.self_attn.o_proj", bias=config.out_bias)
        out += linear(f"{o}.mlp_norm", f"{t}.post_attention_layernorm", bias=False)
        out += linear(f"{o}.mlp.gate_up", (f"{t}.mlp.gate_proj", f"{t}.mlp.up_proj"), bias=config.mlp_bias)
        out += linear(f"{o}.mlp.down", f"{t}.mlp.down_proj", bias=config.mlp_bias)
    out += linear("norm", "model.norm", bias=False)
    if not config.tie_embeddings:
        out.append(rule("lm_head.weight", "lm_head.weight"))
    return out


def split_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of their tensors that are fused in ours (q/k/v, gate/up), so the export splits them right."""
    c, d = config, config.head_size
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(c.layers):
        t = f"model.layers.{i}"
        for p, n in zip("qkv", (c.heads, c.kv_heads, c.kv_heads)):
            shapes[f"{t}.self_attn.{p}_proj.weight"] = (n * d, c.width)
            shapes[f"{t}.self_attn.{p}_proj.bias"] = (n * d,)
    return shapes


def export_config(config: LMConfig) -> dict[str, Any]:
    c = config
    scaling: dict[str, Any] | None = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            scaling |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_context}
    rope = {"rope_theta": c.rope_theta, **(scaling or {"rope_type": "default"})}
    out: dict[str, Any] = {
        "architectures": [MODEL_TYPES[c.architecture]], "model_type": c.architecture,
        "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size, "hidden_act": "silu", "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        # transformers 5 reads rope_parameters; 4.x (and the tools built on its configs) rope_theta + rope_scaling
        "rope_parameters": rope, "rope_theta": c.rope_theta, "rope_scaling": scaling,
        "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids) or None, "pad_token_id": c.pad_token_id,
    }
    if c.architecture == "llama":
        if c.qkv_bias != c.out_bias:
            raise RosettaError("LlamaForCausalLM has biases on all attention projections or none")
        out |= {"attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias}
    elif c.architecture == "qwen2":
        if not c.qkv_bias or c.out_bias or c.mlp_bias:
            raise RosettaError("Qwen2ForCausalLM has biases on q, k and v only")
        out |= {"use_sliding_window": False, "sliding_window": None}
    else:
        if c.qkv_bias or c.out_bias or c.mlp_bias:
            raise RosettaError("MistralForCausalLM has no biases")
        out["sliding_window"] = c.sliding_window
    return out


def export_generation_config(config: LMConfig) -> dict[str, Any]:
    s = config.sampling
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids) or None,
                           "pad_token_id": config.pad_token_id}
    if not s.greedy:
        out |= {"do_sample": True, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
        if s.min_p:
            out["min_p"] = s.min_p
    if s.repetition_penalty != 1:
        out["repetition_penalty"] = s.repetition_penalty
    return out
