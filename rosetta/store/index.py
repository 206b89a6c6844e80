"""Indexing: image files into a store, incrementally, each batch committed as a whole.

`index_files(model, store, paths)` is the task the CLI (`rosetta index`) and the server's upload
endpoint share. A file is identified by its absolute path and known by the sha256 of its bytes: a
file whose hash (and extra metadata) the store already holds is not embedded again. Each batch's
vectors, metadata and hashes go into the store in one `add`, which the embedded store commits as
one transaction, so an interrupted run keeps every batch it finished and a rerun picks up the rest.

`index_source(model, store, source)` indexes a folder (recursively) or a manifest (.jsonl, .csv,
.parquet... with an "image" column; the other columns become metadata), then removes the rows of
that source whose files are gone.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rosetta.errors import InputError, RosettaError
from rosetta.store.base import VectorStore, check_model, split_model

# Metadata every indexed image gets; the rest come from the caller (manifest columns, the source).
FILE_KEYS = ("path", "width", "height", "format", "bytes", "mtime")


@dataclass
class IndexReport:
    """What an indexing run did. Iterating it gives the ids of the files now in the store, in input order."""

    ids: list[str] = field(default_factory=list)  # id of each input now in the store (new, changed or unchanged)
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[str] = field(default_factory=list)  # one line per file that could not be indexed: "path: reason"

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        return (f"{len(self.ids)} images in the store from this run: {self.added} new, {self.updated} changed, "
                f"{self.unchanged} unchanged; {self.removed} removed, {len(self.failed)} failed")


def model_name(model: Any) -> str:
    """The name a store records for a model, `NAME@FINGERPRINT`.

    NAME is its `name` attribute (the CLI and server set it to what the user typed), else the preset whose
    config it has, else one derived from its config. FINGERPRINT sketches the weights the stored vectors
    depend on (`weights_fingerprint`), so two models of one name (a preset's pretrained and random weights)
    are told apart and one model known by two names (`vit-b-32`, `openai/clip-vit-base-patch32`) is
    recognised; see `rosetta.store.base.same_model`.
    """
    name = getattr(model, "name", None)
    if isinstance(name, str) and split_model(name)[1] is not None:  # named with its fingerprint already
        return name
    if not (isinstance(name, str) and name):
        from rosetta.models.config import PRESETS

        config = model.config
        name = next((preset for preset, c in PRESETS.items() if c == config), None)
        name = name or "custom-" + hashlib.sha256(repr(config).encode()).hexdigest()[:12]
    fingerprint = weights_fingerprint(model)
    return f"{name}@{fingerprint}" if fingerprint else name


def weights_fingerprint(model: Any) -> str | None:
    """A sketch of the image tower's weights and projection, as hex; None for a model without them.

    The first `SKETCH_SAMPLE` weights of every matrix are added, with pseudo-random signs, into `SKETCH_SIZE`
    buckets (a count sketch); the bucket sums, normalised, are written as int16s. Casting the weights to
    bf16 or fp16 moves the sketch by the rounding error (1 - cosine ~1e-6 for ViT-B/32); other weights, or
    the same ones moved by a few percent in training, far more (`same_model` draws the line at 1e-4).
    Only the image side counts: a store holds image embeddings, so a LiT model (image tower locked, text
    tower retrained) still searches the stores its base model built.
    """
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    sketch = torch.zeros(SKETCH_SIZE, dtype=torch.float64)
    # Matrices only: norms start at exactly 1 in every model, and would outweigh the rest of a fresh one.
    for key in sorted(k for k, v in state.items() if k.startswith(("vision.", "vision_proj.")) and v.ndim >= 2):
        weights = state[key].detach().flatten()[:SKETCH_SAMPLE].to("cpu", torch.float64)
        generator = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
        signs = torch.randint(0, 2, weights.shape, generator=generator).to(torch.float64) * 2 - 1
        sketch.index_add_(0, torch.randint(0, SKETCH_SIZE, weights.shape, generator=generator), weights * signs)
    norm = sketch.norm()
    if not norm > 0:
        return None
    return (sketch / norm * 32767).round().to(torch.int16).numpy().astype(">i2").tobytes().hex()


SKETCH_SIZE = 8
SKETCH_SAMPLE = 4096


def file_id(path: str | os.PathLike) -> str:
    """A file's id in a store: its absolute, normalised path."""
    return os.path.normpath(os.path.abspath(path))


def index_files(model: Any, store: VectorStore, paths: Sequence[str | os.PathLike], batch_size: int = 32,
                progress: bool | None = None, metadata: dict[str, dict[str, Any]] | None = None) -> IndexReport:
    """Embed the image files `paths` into `store`, skipping those it already holds unchanged.

    model: a ContrastiveModel (or anything with `config`, `embed_images` and optionally `name`); the
        store must have been built by the same model (`model_name(model)`), or RosettaError is raised.
    paths: image files; each is stored under its absolute path as id (see `file_id`).
    batch_size: images per forward pass and per store commit.
    progress: a progress bar on stderr: True, False, or None (shown on a terminal).
    metadata: extra metadata per path (as given in `paths`), stored beside path, width, height, format,
        bytes and mtime; a file whose extra metadata changed is stored again.

    Files that cannot be read or decoded are skipped and listed in the report's `failed`, one line each.
    """
    from rosetta.modalities.image import preprocess

    if batch_size < 1:
        raise RosettaError(f"batch size must be at least 1, got {batch_size}")
    name = model_name(model)
    check_model(store, name, model.config.embed_dim)
    metadata = metadata or {}
    report = IndexReport()
    known = store.hashes()
    size, image_config = model.config.vision.image_size, model.config.image

    def prepare(chunk: Sequence[str | os.PathLike]) -> list[tuple[str, str, dict, Any] | str]:
        """Read, hash and decode one chunk of files (in a worker thread, while the model runs)."""
        out: list[tuple[str, str, dict, Any] | str] = []
        same = []
        for path in chunk:
            try:
                id_, digest, info, image = _read(path)
            except InputError as e:
                out.append(str(e))
                continue
            info.update(metadata.get(path, metadata.get(str(path), {})))
            out.append((id_, digest, info, image))
            if known.get(id_) == digest:
                same.append(id_)
        stored = store.metadata(same) if same else {}
        for i, item in enumerate(out):
            if isinstance(item, tuple):
                id_, digest, info, image = item
                if id_ in stored and _extra(stored[id_]) == _extra(info):
                    out[i] = (id_, digest, info, None)  # unchanged: nothing to embed
                else:
                    out[i] = (id_, digest, info, preprocess(image, size, image_config))
        return out

    first: dict[str, str | os.PathLike] = {}
    for path in paths:
        first.setdefault(file_id(path), path)  # each file once, where it first appears
    unique = list(first.values())
    chunks = [unique[start : start + batch_size] for start in range(0, len(unique), batch_size)]
    done: set[str] = set()
    hide = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    bar = tqdm(total=len(unique), desc="indexing", unit="image", disable=hide, leave=False)
    with ThreadPoolExecutor(max_workers=1) as pool, bar:
        pending = pool.submit(prepare, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            prepared = pending.result()
            pending = pool.submit(prepare, chunks[index + 1]) if index + 1 < len(chunks) else None
            batch = []
            for item in prepared:
                if isinstance(item, str):
                    report.failed.append(item)
                    continue
                done.add(item[0])
                if item[3] is None:
                    report.unchanged += 1
                else:
                    batch.append(item)
            if batch:
                ids = [item[0] for item in batch]
                vectors = model.embed_images(torch.stack([item[3] for item in batch]), batch_size=batch_size)
                store.add(ids, _numpy(vectors), [item[2] for item in batch], [item[1] for item in batch], model=name)
                report.updated += sum(id_ in known for id_ in ids)
                report.added += sum(id_ not in known for id_ in ids)
            bar.update(len(prepared))
    report.ids = [id_ for id_ in map(file_id, paths) if id_ in done]
    return report


def index_source(model: Any, store: VectorStore, source: str | os.PathLike, batch_size: int = 32,
                 progress: bool | None = None) -> IndexReport:
    """Index a folder of images (recursively) or a manifest, then remove the rows of this source whose
    files are gone (or no longer decode). Every row records its source under the metadata key "source"."""
    source = Path(source)
    if not source.exists():
        raise RosettaError(f"{source}: no such file or directory")
    origin = file_id(source)
    paths, extra, failed = _source_files(source)
    metadata = {path: {**columns, "source": origin} for path, columns in extra.items()}
    report = index_files(model, store, paths, batch_size=batch_size, progress=progress, metadata=metadata)
    report.failed[:0] = failed
    present = set(report.ids)
    stale = [id_ for id_ in store.hashes(where=f"source = {quote(origin)}") if id_ not in present]
    store.remove(stale)
    report.removed = len(stale)
    return report


def quote(value: str) -> str:
    """A string as a quoted literal of the `where` language."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _source_files(source: Path) -> tuple[list[str], dict[str, dict[str, Any]], list[str]]:
    """The image files of a folder or a manifest, the extra metadata of each, and the rows that name no file."""
    from rosetta.modalities.image import find_images

    if source.is_dir():
        paths = [str(p) for p in find_images([source])]
        return paths, {p: {} for p in paths}, []
    from rosetta.data.records import read_records

    paths, extra, failed = [], {}, []
    for record in read_records(source):
        image = record.get("image")
        if not isinstance(image, str) or "://" in image:
            failed.append(f"{source}: record {record.get('key')!r}: no local image file "
                          f"({'a URL' if isinstance(image, str) else 'embedded bytes' if image else 'no image'})")
            continue
        columns = {k: v for k, v in record.items() if k != "image" and k not in FILE_KEYS and k != "source"}
        if image not in extra:
            paths.append(image)
        extra[image] = _jsonable(columns)
    return paths, extra, failed


def _read(path: str | os.PathLike) -> tuple[str, str, dict[str, Any], Any]:
    """A file's id, sha256, file metadata and decoded RGB image; InputError naming it if it cannot be used."""
    from PIL import Image

    from rosetta.modalities.image import load_image

    name = str(path)
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        image = load_image(data)
    except InputError as e:
        raise InputError(f"{name}: {str(e).split(': ', 1)[-1]}") from None
    try:
        format_ = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - it decoded above; the format name is only informative
        format_ = None
    info = {"path": file_id(path), "width": image.width, "height": image.height,
            "format": format_.lower() if format_ else None, "bytes": len(data), "mtime": stat.st_mtime}
    return file_id(path), hashlib.sha256(data).hexdigest(), info, image


def _extra(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k not in FILE_KEYS}


def _jsonable(columns: dict[str, Any]) -> dict[str, Any]:
    """Manifest values as JSON keeps them (bytes, dates... become strings; NaN becomes null)."""
    import math

    out = {}
    for key, value in columns.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        out[str(key)] = value
    return out


def _numpy(vectors: Any):
    return vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
