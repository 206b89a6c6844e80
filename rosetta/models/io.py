"""Reading and writing model directories: Rosetta's own format and the foreign ones people use."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosetta.convert import open_clip as oc
from rosetta.convert import transformers as hf
from rosetta.convert.mapping import to_ours, to_theirs
from rosetta.errors import RosettaError
from rosetta.files import atomic_write, write_json, write_safetensors
from rosetta.hub import resolve
from rosetta.modalities.text import BOS, EOS, TextTokenizer, clip_bpe, load_tokenizer_files
from rosetta.models.config import PRESETS, ContrastiveConfig
from rosetta.models.contrastive import ContrastiveModel

FORMAT = "rosetta"
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); without it bf16 is slower than fp32."""
    return bool(set(cpuinfo("flags").split()) & {"avx512_bf16", "amx_bf16"})


def cpuinfo(field: str) -> str:
    """The value of `field` for the first CPU in /proc/cpuinfo; "" where it is absent or unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.startswith(field)), "")
    return line.split(":", 1)[-1].strip()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`"auto"` is the fast path: bf16 (fp16 on older GPUs) on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise RosettaError(f"unknown dtype {dtype!r} (expected auto, fp32, bf16 or fp16)")
    return _DTYPES[dtype]


def create(preset_or_config: str | ContrastiveConfig) -> ContrastiveModel:
    """An untrained model from a preset name or a config."""
    if isinstance(preset_or_config, ContrastiveConfig):
        return ContrastiveModel(preset_or_config)
    if preset_or_config not in PRESETS:
        raise RosettaError(f"unknown preset {preset_or_config!r} (choose from {', '.join(PRESETS)})")
    return ContrastiveModel(PRESETS[preset_or_config])


def load(
    name_or_path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> ContrastiveModel:
    """Load a model from Rosetta's format, a transformers CLIP/SigLIP directory, or an open_clip hub export.

    `name_or_path` is a local directory, a hub repo id, or a preset name with pretrained weights
    (e.g. "vit-b-32" loads openai/clip-vit-base-patch32).
    """
    directory = resolve(name_or_path)
    device = resolve_device(device)
    if (directory / oc.CONFIG_FILE).exists():
        config = oc.read_config(directory)
        raw = read_weights(directory, oc.WEIGHT_FILES)
        rules = oc.rules(config, set(raw))
    elif hf.model_type(directory) in ("clip", "siglip"):
        config = hf.read_config(directory)
        raw = read_weights(directory, ("model.safetensors", "pytorch_model.bin"))
        rules = hf.rules(config)
    elif _is_rosetta(directory):
        config = ContrastiveConfig.from_dict(json.loads((directory / "config.json").read_text())["model"])
        raw, rules = read_weights(directory, ("model.safetensors",)), None
    else:
        raise RosettaError(f"{directory}: not a model directory Rosetta knows (Rosetta, transformers or open_clip)")

    tokenizer = _tokenizer(directory, config)
    with torch.device("meta"):
        model = ContrastiveModel(config, tokenizer=tokenizer)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    state = raw if rules is None else to_ours(rules, raw, shapes, str(directory))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise RosettaError(f"{directory}: weights do not fit the config ({str(e).splitlines()[1].strip()})") from None
    return model.to(device=device, dtype=resolve_dtype(dtype, device)).eval()


def _is_rosetta(directory: Path) -> bool:
    config = directory / "config.json"
    return config.exists() and json.loads(config.read_text()).get("format") == FORMAT


def _tokenizer(directory: Path, config: ContrastiveConfig) -> TextTokenizer:
    backend = load_tokenizer_files(directory)
    if backend is None:
        # open_clip's default tokenizer is OpenAI CLIP's BPE, which its exports often do not ship.
        clip = resolve("openai/clip-vit-base-patch32")
        backend = load_tokenizer_files(clip) or clip_bpe(clip / "vocab.json", clip / "merges.txt")
    return TextTokenizer(backend, config.text.context_length, config.text.pad_token_id, config.text.cleaning)


def read_weights(directory: Path, candidates: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors from the first weight file present: safetensors (also sharded), else a pickle read with weights_only."""
    for name in candidates:
        path = directory / name
        index = directory / f"{name}.index.json"
        if path.suffix == ".safetensors" and index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
        if not path.exists():
            continue
        if path.suffix == ".safetensors":
            return load_file(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means we will not trust this file
            raise RosettaError(f"{path}: not a plain tensor checkpoint, refusing to unpickle it ({e})") from None
        return state.get("state_dict", state)
    raise RosettaError(f"{directory}: no weights found (looked for {', '.join(candidates)})")


def save_model(model: ContrastiveModel, directory: Path, format: str = FORMAT) -> Path:
    """Write `model` to `directory` in Rosetta's format or, with format="transformers", as a CLIPModel."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if format == FORMAT:
        write_safetensors(state, directory / "model.safetensors")
        config = {"format": FORMAT, "family": "contrastive", "model": model.config.to_dict()}
        write_json(directory / "config.json", config)
    elif format == "transformers":
        backend = model.tokenizer.backend
        bos, eos = backend.token_to_id(BOS), backend.token_to_id(EOS)
        if bos is None or eos is None:
            raise RosettaError("exporting to transformers needs a tokenizer with start- and end-of-text tokens")
        config = hf.export_config(model.config, eos_token_id=eos, bos_token_id=bos)
        theirs = to_theirs(hf.rules(model.config), state, shapes={"logit_scale": ()})  # a scalar in CLIPModel
        write_safetensors(theirs, directory / "model.safetensors")
        write_json(directory / "config.json", config)
        write_json(directory / "preprocessor_config.json", hf.export_preprocessor(model.config))
        # transformers' CLIPTokenizer rebuilds CLIP's BPE from tokenizer.json; any other tokenizer (the byte-level
        # one of models trained from scratch) loads as it is written.
        clip = getattr(backend.model, "end_of_word_suffix", None) == "</w>"
        write_json(directory / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer" if clip else "PreTrainedTokenizerFast",
            "model_max_length": model.config.text.context_length,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        })
    else:
        raise RosettaError(f"unknown format {format!r} (expected rosetta or transformers)")
    atomic_write(directory / "tokenizer.json", lambda f: f.write(model.tokenizer.backend.to_str().encode()))
    return directory


__all__ = ["create", "load", "save_model", "read_weights", "resolve_dtype", "resolve_device"]
