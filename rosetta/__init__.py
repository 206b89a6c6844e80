"""Rosetta: multimodal foundation models — one embedding space for text and images, and the tasks on it."""

from rosetta.errors import InputError, ModelNotFoundError, RosettaError
from rosetta.models.config import PRESETS, ContrastiveConfig, ImageConfig, TextConfig, VisionConfig
from rosetta.models.contrastive import ContrastiveModel
from rosetta.models.io import create, load
from rosetta.store import open_store as Store  # noqa: F401 - rosetta.Store(location, model=..., dim=...)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ContrastiveConfig", "ContrastiveModel", "ImageConfig", "InputError", "ModelNotFoundError",
    "RosettaError", "TextConfig", "VisionConfig", "create", "load",
]
