"""Finding a model directory: a local path, or a hub repo fetched through huggingface_hub's cache."""

from __future__ import annotations

import re
from pathlib import Path

from rosetta.errors import ModelNotFoundError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_METADATA = ["*.json", "*.txt", "*.model", "*.jinja"]  # configs, tokenizer files, chat templates


def resolve(name_or_path: str | Path) -> Path:
    """A local directory holding the model's files, downloading from the hub (or its cache) if needed."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{name}: is a file; a model is a directory (config + weights)")
    from rosetta.models.registry import presets, pretrained

    repo_id = pretrained().get(name, name)
    if not _REPO_ID.match(repo_id):
        if name in presets():
            raise ModelNotFoundError(
                f"{name}: this preset has no pretrained weights; build it untrained (rosetta.create, --random-init)"
            )
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a preset ({', '.join(presets())}), a local directory, or a hub repo id"
        )
    directory = _download(repo_id, [*_METADATA, "*.safetensors"])
    if not any(directory.glob("*.safetensors")):  # older repos ship only pickled weights
        directory = _download(repo_id, [*_METADATA, "*.bin"])
    return directory


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id}: gated on the hub; accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such model on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if isinstance(e, HfHubHTTPError) and not isinstance(e, LocalEntryNotFoundError):
            reason = f"the hub answered: {str(e).splitlines()[0]}"
        else:
            reason = "the Hugging Face Hub cannot be reached"
        raise ModelNotFoundError(
            f"{repo_id}: {reason}, and it is not in the local cache ({constants.HF_HUB_CACHE}); "
            f"connect to the network, or fetch it elsewhere (hf download {repo_id}) and pass its directory"
        ) from None
