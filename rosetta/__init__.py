"""Rosetta: multimodal foundation models — one embedding space for text and images, language models that
generate, and the tasks on them."""

from rosetta.errors import InputError, ModelNotFoundError, RosettaError
from rosetta.models.config import PRESETS, ContrastiveConfig, ImageConfig, TextConfig, VisionConfig
from rosetta.models.contrastive import ContrastiveModel
from rosetta.models.io import keep_freed_memory
from rosetta.models.lm import CausalLM, LMConfig
from rosetta.models.registry import create, load, presets
from rosetta.store import open_store as Store  # noqa: F401 - rosetta.Store(location, model=..., dim=...)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CausalLM", "ContrastiveConfig", "ContrastiveModel", "ImageConfig", "InputError", "LMConfig",
    "ModelNotFoundError", "RosettaError", "TextConfig", "VisionConfig", "create", "keep_freed_memory", "load",
    "presets",
]
