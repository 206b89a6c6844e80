"""Hosted vision-language models behind the calls of a local one: `rosetta.load("openai:gpt-4o")`,
`"anthropic:claude-sonnet-4-5"`, `"gemini:gemini-2.5-flash"`, through each vendor's official SDK."""

from __future__ import annotations

import importlib

from rosetta.errors import RosettaError

VENDORS = {"openai": "rosetta.hosted.openai", "anthropic": "rosetta.hosted.anthropic",
           "gemini": "rosetta.hosted.gemini"}


def is_hosted(name: object) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in VENDORS and ":" in name


def load_hosted(name: str, **options):
    """The hosted model `vendor:model` (options: api_key, base_url, timeout, max_retries, cache, prices)."""
    vendor, _, model = name.partition(":")
    if not model:
        raise RosettaError(f"{name}: name the model after the vendor, e.g. {vendor}:gpt-4o")
    try:
        module = importlib.import_module(VENDORS[vendor])
    except ImportError as e:
        raise RosettaError(f"{name}: the vendor's SDK is not installed ({e.name}); pip install {e.name}") from None
    return module.MODEL_CLASS(model, **options)
