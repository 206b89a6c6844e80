"""The registry of model families: what `rosetta.load`, `rosetta.create` and `save_pretrained` consult.

A family (contrastive, lm, and the ones to come) declares, as a `Family` named `FAMILY` in its module:
its config class and presets, its model class, how to read its tokenizer, and the converters of the
foreign checkpoints it reads. A converter is a module in `rosetta.convert` with

    NAME                             the format's name ("transformers", "open_clip")
    recognises(directory, config)    does this directory (and its parsed config.json) hold this format?
    read(directory)                  -> (our config, their tensors, rules mapping them onto ours)
    export(model, directory)         optional: write the model in this format
    exports(model)                   optional: can `export` write this model (when converters share a format)?

Rosetta's own format is the same for every family: `config.json` naming the family, `model.safetensors`
with our tensor names, and the tokenizer's files.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from rosetta.errors import RosettaError
from rosetta.files import write_json, write_safetensors

FORMAT = "rosetta"

# Modules that define a FAMILY. A new family appends its module here.
FAMILY_MODULES: list[str] = ["rosetta.models.contrastive", "rosetta.models.lm", "rosetta.models.asr",
                             "rosetta.models.vlm", "rosetta.models.clap"]


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type  # a frozen dataclass with to_dict() and from_dict()
    model_class: type  # built as model_class(config, tokenizer=...)
    presets: Mapping[str, Any]
    pretrained: Mapping[str, str]  # preset name -> the hub checkpoint it loads
    converters: tuple[str, ...]  # modules in rosetta.convert
    read_tokenizer: Callable[[Path, Any], Any]  # (directory, config) -> the model's tokenizer

    def converter_modules(self) -> list[ModuleType]:
        return [importlib.import_module(f"rosetta.convert.{name}") for name in self.converters]


@functools.cache
def families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(module).FAMILY for module in FAMILY_MODULES)


def family(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise RosettaError(f"unknown model family {name!r} (Rosetta knows {', '.join(f.name for f in families())})")


def presets() -> dict[str, Any]:
    return {name: config for f in families() for name, config in f.presets.items()}


def pretrained() -> dict[str, str]:
    return {name: repo for f in families() for name, repo in f.pretrained.items()}


def create(preset_or_config: str | Any):
    """An untrained model of any family, from a preset name or a config."""
    for f in families():
        if isinstance(preset_or_config, f.config_class):
            return f.model_class(preset_or_config)
        if isinstance(preset_or_config, str) and preset_or_config in f.presets:
            return f.model_class(f.presets[preset_or_config])
    raise RosettaError(f"unknown preset {preset_or_config!r} (choose from {', '.join(presets())})")


def load(name_or_path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Load a model of any family from Rosetta's format or a foreign checkpoint directory the family reads.

    `name_or_path` is a local directory, a hub repo id, or a preset name with pretrained weights
    (e.g. "vit-b-32" loads openai/clip-vit-base-patch32, "smollm2-135m" HuggingFaceTB/SmolLM2-135M-Instruct),
    or a hosted vision-language model, "openai:gpt-4o", "anthropic:claude-sonnet-4-5", "gemini:gemini-2.5-flash"
    (rosetta.hosted; the key from the vendor's usual environment variable), or "ocr" (Tesseract, rosetta.vlm.ocr).
    """
    from rosetta.convert.mapping import to_ours
    from rosetta.hub import resolve
    from rosetta.models.io import place, read_weights
    from rosetta.vlm.backends import backend

    model = backend(name_or_path)  # "ocr", "openai:gpt-4o": a program or a vendor's API, not weights
    if model is not None:
        return model
    directory = resolve(name_or_path)
    fam, converter = identify(directory)
    if converter is None:
        config = fam.config_class.from_dict(_config_json(directory)["model"])
        theirs, rules = read_weights(directory, ("model.safetensors",)), None
    else:
        config, theirs, rules = converter.read(directory)
    tokenizer = fam.read_tokenizer(directory, config)
    with torch.device("meta"):
        model = fam.model_class(config, tokenizer=tokenizer)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    state = theirs if rules is None else to_ours(rules, theirs, shapes, str(directory))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise RosettaError(f"{directory}: weights do not fit the config ({str(e).splitlines()[1].strip()})") from None
    return place(model, device, dtype).eval()


def identify(directory: Path) -> tuple[Family, ModuleType | None]:
    """The family a directory holds and the converter that reads it (None: Rosetta's own format)."""
    config = _config_json(directory)
    if config.get("format") == FORMAT:
        return family(config.get("family", "contrastive")), None
    for f in families():
        for converter in f.converter_modules():
            if converter.recognises(directory, config):
                return f, converter
    raise RosettaError(f"{directory}: {_what_it_is(config)}; Rosetta reads {supported()}")


def supported() -> str:
    """The formats Rosetta reads, for error messages."""
    kinds = []
    for f in families():
        for converter in f.converter_modules():
            kinds.append(f"{converter.NAME} {'/'.join(getattr(converter, 'MODEL_TYPES', ())) or f.name}".strip())
    return ", ".join([*dict.fromkeys(kinds), "Rosetta's own directories"])


def _what_it_is(config: dict[str, Any]) -> str:
    if not config:
        return "no config.json (or an empty one): not a model directory"
    model_type = config.get("model_type")
    architectures = ", ".join(config.get("architectures") or [])
    if model_type or architectures:
        return f"config.json says model_type {model_type!r}" + (f" ({architectures})" if architectures else "")
    return "config.json names no model_type or architectures"


def _config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RosettaError(f"{path}: not valid JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def save(model, directory: Path, format: str = FORMAT) -> Path:
    """Write `model` to `directory` in Rosetta's format, or in a foreign format its family's converters write."""
    fam = next((f for f in families() if isinstance(model, f.model_class)), None)
    if fam is None:
        raise RosettaError(f"{type(model).__name__} is not a model of a registered family")
    if getattr(model, "quantized", False):
        raise RosettaError("an int8 model is not saved: save the model it was made from, and load that with "
                           "dtype='int8'")
    directory.mkdir(parents=True, exist_ok=True)
    if format == FORMAT:
        state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        write_safetensors(state, directory / "model.safetensors")
        write_json(directory / "config.json", {"format": FORMAT, "family": fam.name, "model": model.config.to_dict()})
        model.tokenizer.save(directory)
        return directory
    writers = [c for c in fam.converter_modules() if hasattr(c, "export")]
    if format not in {c.NAME for c in writers}:
        raise RosettaError(f"unknown format {format!r} for a {fam.name} model (expected "
                           f"{' or '.join(dict.fromkeys([FORMAT, *(c.NAME for c in writers)]))})")
    # Several converters may write one format (LLaVA's and SmolVLM's layouts are both transformers'): the
    # first that takes this model's architecture writes it.
    fits = [c for c in writers if c.NAME == format and getattr(c, "exports", lambda m: True)(model)]
    if not fits:
        raise RosettaError(f"no {format} layout for this {fam.name} model's architecture")
    fits[0].export(model, directory)
    return directory
