"""CTranslate2 / faster-whisper model directories: `model.bin` + `config.json` + `tokenizer.json`.

`model.bin` is what CTranslate2's model-spec serialiser writes (binary version 4 and later):

    uint32 version, string spec name, uint32 spec revision, uint32 variable count,
    per variable: string name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 byte count, the bytes,
    uint32 alias count, per alias: string alias, string target

where a string is a uint16 length (with its terminating NUL) and the characters, and dtype indexes
(float32, int8, int16, int32, float16, bfloat16). Quantised weights keep a scale beside them: int8 weights
have a float `weight_scale` per output row (weight = int8 / scale), int16 one for the whole matrix.
Only Whisper's spec is read; the layer names follow CTranslate2's Whisper converter.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import torch

from rosetta.convert.mapping import Rule, rule
from rosetta.errors import RosettaError
from rosetta.models.asr import ASRConfig

NAME = "ctranslate2"
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


def recognises(directory: Path, config: dict[str, Any]) -> bool:
    return (directory / "model.bin").is_file() and not (directory / "pytorch_model.bin").exists()


def read_model_bin(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The spec name and every variable of a CTranslate2 model.bin (aliases resolved), dequantised to float32."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, data, pos)
            pos += struct.calcsize("<" + fmt)
            return values if len(values) > 1 else values[0]

        def string() -> str:
            nonlocal pos
            length = take("H")
            text = bytes(data[pos : pos + length - 1]).decode("utf-8")
            pos += length
            return text

        try:
            version = take("I")
            if not 4 <= version <= 6:
                raise RosettaError(f"{path}: CTranslate2 binary version {version}; Rosetta reads versions 4 to 6")
            spec, _revision, count = string(), take("I"), take("I")
            raw: dict[str, torch.Tensor] = {}
            for _ in range(count):
                name = string()
                rank = take("B")
                dims = [take("I") for _ in range(rank)]
                dtype, size = _DTYPES[take("B")], take("I")
                if pos + size > len(data):
                    raise ValueError(f"{name} needs {size} bytes, the file has {len(data) - pos} left")
                tensor = torch.frombuffer(bytearray(data[pos : pos + size]), dtype=dtype) if size else torch.empty(0)
                raw[name] = tensor.reshape(dims)
                pos += size
            for _ in range(take("I")):
                alias, target = string(), string()
                raw[alias] = raw[target]
        except (struct.error, IndexError, ValueError) as e:
            raise RosettaError(f"{path}: not a CTranslate2 model.bin, or a truncated one ({e})") from None
    return spec, _dequantise(raw)


def _dequantise(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in raw.items():
        if name.endswith("_scale"):
            continue
        scale = raw.get(f"{name}_scale")
        if scale is not None:
            per_row = scale.float().reshape(-1, *([1] * (tensor.ndim - 1))) if scale.numel() > 1 else scale.float()
            tensor = tensor.float() / per_row
        out[name] = tensor.float() if tensor.is_floating_point() or scale is not None else tensor
    return out


def read(directory: Path) -> tuple[ASRConfig, dict, list[Rule]]:
    spec, variables = read_model_bin(directory / "model.bin")
    if spec != "WhisperSpec":
        raise RosettaError(f"{directory}: a CTranslate2 {spec}; Rosetta reads CTranslate2's Whisper models")
    config = _config(directory, variables)
    return config, variables, rules(config)


def _layers(variables: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", name))}
    return max(found) + 1 if found else 0


def _config(directory: Path, variables: dict[str, torch.Tensor]) -> ASRConfig:
    ct2 = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else {}
    vocab, width = variables["decoder/embeddings/weight"].shape
    return ASRConfig(
        n_mels=variables["encoder/conv1/weight"].shape[1],
        audio_context=variables["encoder/position_encodings/encodings"].shape[0], width=width,
        encoder_layers=_layers(variables, "encoder"), encoder_heads=int(variables["encoder/num_heads"]),
        decoder_layers=_layers(variables, "decoder"), decoder_heads=int(variables["decoder/num_heads"]),
        mlp_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0], vocab_size=vocab,
        text_context=variables["decoder/position_encodings/encodings"].shape[0], multilingual=vocab >= 51865,
        alignment_heads=tuple(tuple(h) for h in ct2.get("alignment_heads") or ()),
        suppress_tokens=tuple(ct2.get("suppress_ids") or ()),
        begin_suppress_tokens=tuple(ct2.get("suppress_ids_begin") or ()),
    )


def _norm(ours: str, theirs: str) -> list[Rule]:
    return [rule(f"{ours}.weight", f"{theirs}/gamma"), rule(f"{ours}.bias", f"{theirs}/beta")]


def _linear(ours: str, theirs: str) -> list[Rule]:
    return [rule(f"{ours}.weight", f"{theirs}/weight"), rule(f"{ours}.bias", f"{theirs}/bias")]


def rules(config: ASRConfig) -> list[Rule]:
    out = _linear("encoder.conv1", "encoder/conv1") + _linear("encoder.conv2", "encoder/conv2")
    out.append(rule("encoder.pos_embed", "encoder/position_encodings/encodings"))
    for i in range(config.encoder_layers):
        o, t = f"encoder.transformer.blocks.{i}", f"encoder/layer_{i}"
        out += _norm(f"{o}.norm1", f"{t}/self_attention/layer_norm")
        out += _linear(f"{o}.attn.qkv", f"{t}/self_attention/linear_0")
        out += _linear(f"{o}.attn.out", f"{t}/self_attention/linear_1")
        out += _norm(f"{o}.norm2", f"{t}/ffn/layer_norm")
        out += _linear(f"{o}.mlp.fc1", f"{t}/ffn/linear_0") + _linear(f"{o}.mlp.fc2", f"{t}/ffn/linear_1")
    out += _norm("encoder.norm", "encoder/layer_norm")
    out += [rule("embed.weight", "decoder/embeddings/weight"),
            rule("pos_embed", "decoder/position_encodings/encodings")]
    for i in range(config.decoder_layers):
        o, t = f"blocks.{i}", f"decoder/layer_{i}"
        out += _norm(f"{o}.attn_norm", f"{t}/self_attention/layer_norm")
        out += _linear(f"{o}.attn.qkv", f"{t}/self_attention/linear_0")
        out += _linear(f"{o}.attn.out", f"{t}/self_attention/linear_1")
        out += _norm(f"{o}.cross_norm", f"{t}/attention/layer_norm")
        out += _linear(f"{o}.cross.q", f"{t}/attention/linear_0")
        out += _linear(f"{o}.cross.kv", f"{t}/attention/linear_1")
        out += _linear(f"{o}.cross.out", f"{t}/attention/linear_2")
        out += _norm(f"{o}.mlp_norm", f"{t}/ffn/layer_norm")
        out += _linear(f"{o}.mlp.fc1", f"{t}/ffn/linear_0") + _linear(f"{o}.mlp.fc2", f"{t}/ffn/linear_1")
    out += _norm("norm", "decoder/layer_norm")
    return out


