"""Indexing: image, sound and video files into a store, incrementally, each file committed whole.

`index_files(model, store, paths)` is the task the CLI (`rosetta index`) and the server's upload
endpoint share. A file is identified by its absolute path and known by the sha256 of its bytes: a
file whose hash (and extra metadata) the store already holds is not embedded again. An image is one
row, stored under the file's id; a sound or a video is one row per window of it (the model's
`embed_audio_segments` / `embed_video_segments`), stored under `FILE#0`, `FILE#1`... with the window's
`start` and `end` seconds, so that a search can say where in a recording the match is (see
`rosetta.search`). Each batch of images, and all the windows of one sound or video, go into the store
in one `add`, which the embedded store commits as one transaction: an interrupted run keeps every
file it finished (never part of a video) and a rerun picks up the rest.

`index_source(model, store, source)` indexes a folder (recursively) or a manifest (.jsonl, .csv,
.parquet... with an "image", "audio" or "video" column; the other columns become metadata), then
removes the rows of that source whose files are gone.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections.abc import Container, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rosetta.errors import InputError, RosettaError
from rosetta.modalities.sniff import find_media
from rosetta.store.base import VectorStore, check_model, split_model

# Metadata the index writes (an image's size; a sound's or video's window); the rest come from the caller
# (manifest columns, the source).
FILE_KEYS = ("path", "width", "height", "format", "bytes", "mtime", "media", "start", "end", "segment", "segments")
MANIFEST_COLUMNS = ("image", "audio", "video")  # where a manifest row names its file, the first one it has


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
        return (f"{len(self.ids)} files in the store from this run: {self.added} new, {self.updated} changed, "
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
    """A sketch of the image tower's weights and projection (a model without one: its audio tower's), as hex;
    None for a model without either.

    The first `SKETCH_SAMPLE` weights of every matrix are added, with pseudo-random signs, into `SKETCH_SIZE`
    buckets (a count sketch); the bucket sums, normalised, are written as int16s. Casting the weights to
    bf16 or fp16 moves the sketch by the rounding error (1 - cosine ~1e-6 for ViT-B/32); other weights, or
    the same ones moved by a few percent in training, far more (`same_model` draws the line at 1e-4).
    Only the image side counts: a store holds image embeddings, so a LiT model (image tower locked, text
    tower retrained) still searches the stores its base model built. A model that hears only (CLAP) fills
    its stores with sound embeddings: its audio tower is the side that counts.
    """
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    sketch = torch.zeros(SKETCH_SIZE, dtype=torch.float64)
    towers = ("vision.", "vision_proj.")
    if not any(k.startswith(towers) for k in state):
        towers = ("audio.", "audio_proj.")
    # Matrices only: norms start at exactly 1 in every model, and would outweigh the rest of a fresh one.
    for key in sorted(k for k, v in state.items() if k.startswith(towers) and v.ndim >= 2):
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


def segment_id(file: str, segment: int) -> str:
    """The row id of a sound's or video's `segment`-th window: `FILE#N`."""
    return f"{file}#{segment}"


def file_rows(ids: Container[str], file: str) -> list[str]:
    """The rows among `ids` that hold `file`: its own id (an image), or its windows `FILE#0`, `FILE#1`...
    (a sound or a video), which are written together and so numbered without gaps."""
    rows = [file] if file in ids else []
    return rows + list(itertools.takewhile(ids.__contains__, (segment_id(file, i) for i in itertools.count())))


@dataclass
class _File:
    """One input file as the reading thread hands it over."""

    name: str  # the path as given, for messages
    id: str
    digest: str
    info: dict[str, Any]  # its metadata: file keys and the caller's
    modality: str  # "image", "audio" or "video"
    pixels: Any = None  # an image: decoded, then preprocessed if it is to be embedded
    rows: list[str] | None = None  # the rows of an unchanged file, already in the store; None: embed it


def index_files(model: Any, store: VectorStore, paths: Sequence[str | os.PathLike], batch_size: int = 32,
                progress: bool | None = None, metadata: dict[str, dict[str, Any]] | None = None) -> IndexReport:
    """Embed the image, sound and video files `paths` into `store`, skipping those it already holds unchanged.

    model: a ContrastiveModel (or anything with `config.embed_dim`, `embed_images`, `embed_audio_segments`,
        `embed_video_segments` or `embed_audio`, and optionally `name`); the store must have been built by
        the same model (`model_name(model)`), or RosettaError is raised.
    paths: files, told apart by `rosetta.modalities.sniff.modality_of`; each is stored under its absolute
        path (see `file_id`), a sound or a video as one row per window (see `segment_id`).
    batch_size: images per forward pass and per store commit.
    progress: a progress bar on stderr: True, False, or None (shown on a terminal).
    metadata: extra metadata per path (as given in `paths`), stored beside the file's own (path, format,
        bytes, mtime; an image's width and height; a window's media, start, end, segment and segments);
        a file whose extra metadata changed is stored again.

    Files that cannot be read or decoded, and sounds given to a model that does not hear, are skipped and
    listed in the report's `failed`, one line each.
    """
    from rosetta.modalities.image import preprocess
    from rosetta.modalities.sniff import modality_of

    if batch_size < 1:
        raise RosettaError(f"batch size must be at least 1, got {batch_size}")
    name = model_name(model)
    check_model(store, name, model.config.embed_dim)
    metadata = metadata or {}
    report = IndexReport()
    known = store.hashes()
    sees = callable(getattr(model, "embed_images", None))

    def prepare(chunk: Sequence[str | os.PathLike]) -> list[_File | str]:
        """Read, hash and decode one chunk of files (in a worker thread, while the model runs)."""
        out: list[_File | str] = []
        for path in chunk:
            modality = modality_of(path)
            try:
                if modality == "image" and not sees:
                    raise InputError(f"{path}: this model does not embed images")
                file = _read(path, modality)
            except InputError as e:
                out.append(str(e))
                continue
            file.info.update(metadata.get(path, metadata.get(str(path), {})))
            out.append(file)
        heads = {f.id: _head(f) for f in out if isinstance(f, _File) and known.get(_head(f)) == f.digest}
        stored = store.metadata(list(heads.values())) if heads else {}
        for file in out:
            if not isinstance(file, _File):
                continue
            head = stored.get(heads.get(file.id))
            if head is not None and _extra(head) == _extra(file.info):  # unchanged: nothing to embed
                rows = head.get("segments")
                file.rows = [file.id] if rows is None else [segment_id(file.id, i) for i in range(rows)]
            elif file.modality == "image":
                file.pixels = preprocess(file.pixels, model.config.vision.image_size, model.config.image)
        return out

    first: dict[str, str | os.PathLike] = {}
    for path in paths:
        first.setdefault(file_id(path), path)  # each file once, where it first appears
    unique = list(first.values())
    chunks = [unique[start : start + batch_size] for start in range(0, len(unique), batch_size)]
    done: set[str] = set()
    hide = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    bar = tqdm(total=len(unique), desc="indexing", unit="file", disable=hide, leave=False)
    with ThreadPoolExecutor(max_workers=1) as pool, bar:
        pending = pool.submit(prepare, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            prepared = pending.result()
            pending = pool.submit(prepare, chunks[index + 1]) if index + 1 < len(chunks) else None
            images = []
            for file in prepared:
                if isinstance(file, str):
                    report.failed.append(file)
                elif file.rows is not None:
                    # A run killed between a file's new windows and the removal of its old, extra ones left
                    # those behind: they go now.
                    store.remove([row for row in file_rows(known, file.id) if row not in file.rows])
                    report.unchanged += 1
                    done.add(file.id)
                elif file.modality == "image":
                    images.append(file)
                else:
                    try:
                        _add_segments(model, store, name, file, known)
                    except InputError as e:
                        report.failed.append(f"{file.name}: {str(e).removeprefix(f'{file.name}: ')}")
                        continue
                    _count(report, [file], known)
                    done.add(file.id)
            if images:
                vectors = model.embed_images(torch.stack([f.pixels for f in images]), batch_size=batch_size)
                store.add([f.id for f in images], _numpy(vectors), [f.info for f in images],
                          [f.digest for f in images], model=name)
                store.remove([row for f in images for row in file_rows(known, f.id) if row != f.id])
                _count(report, images, known)
                done.update(f.id for f in images)
            bar.update(len(prepared))
    report.ids = [id_ for id_ in map(file_id, paths) if id_ in done]
    return report


def _head(file: _File) -> str:
    """The row whose hash and metadata say whether a file is stored unchanged: an image's own, a recording's first."""
    return file.id if file.modality == "image" else segment_id(file.id, 0)


def _add_segments(model: Any, store: VectorStore, name: str, file: _File, known: dict[str, str]) -> None:
    """Embed a sound's or a video's windows and store them in one `add`, then drop its rows of before beyond them."""
    segments = _segments(model, file.modality, file.name)
    ids = [segment_id(file.id, i) for i in range(len(segments))]
    rows = [{**file.info, "start": round(start, 3), "end": None if end is None else round(end, 3), "segment": i,
             "segments": len(segments)} for i, (start, end, _) in enumerate(segments)]
    vectors = torch.stack([vector for _, _, vector in segments])
    store.add(ids, _numpy(vectors), rows, [file.digest] * len(ids), model=name)
    store.remove([row for row in file_rows(known, file.id) if row not in ids])


def _segments(model: Any, modality: str, path: str) -> list[tuple[float, float | None, torch.Tensor]]:
    """(start s, end s, embedding) of each window of a sound or video file, as the model cuts it (ours, and CLAP
    in 10-s windows); a model that embeds whole clips only gives one row for the whole sound, its end unknown."""
    if modality == "video":
        if not callable(getattr(model, "embed_video_segments", None)):
            raise InputError("this model does not embed videos")
        return model.embed_video_segments(path)
    if callable(getattr(model, "embed_audio_segments", None)):
        return model.embed_audio_segments(path)
    if callable(getattr(model, "embed_audio", None)):
        return [(0.0, None, model.embed_audio([path])[0])]
    raise InputError("this model does not embed sounds")


def _count(report: IndexReport, files: list[_File], known: dict[str, str]) -> None:
    updated = sum(bool(file_rows(known, f.id)) for f in files)
    report.updated += updated
    report.added += len(files) - updated


def index_source(model: Any, store: VectorStore, source: str | os.PathLike, batch_size: int = 32,
                 progress: bool | None = None) -> IndexReport:
    """Index a folder of images, sounds and videos (recursively) or a manifest, then remove the rows of this
    source whose files are gone (or no longer decode). Every row records its source under the metadata key
    "source"."""
    source = Path(source)
    if not source.exists():
        raise RosettaError(f"{source}: no such file or directory")
    origin = file_id(source)
    paths, extra, failed = _source_files(source)
    metadata = {path: {**columns, "source": origin} for path, columns in extra.items()}
    report = index_files(model, store, paths, batch_size=batch_size, progress=progress, metadata=metadata)
    report.failed[:0] = failed
    rows = store.hashes(where=f"source = {quote(origin)}")
    present = {row for file in report.ids for row in file_rows(rows, file)}
    stale = [id_ for id_ in rows if id_ not in present]
    report.removed = len({meta.get("path", id_) for id_, meta in store.metadata(stale).items()})
    store.remove(stale)
    return report


def quote(value: str) -> str:
    """A string as a quoted literal of the `where` language."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _source_files(source: Path) -> tuple[list[str], dict[str, dict[str, Any]], list[str]]:
    """The files of a folder or a manifest, the extra metadata of each, and the rows that name no file."""
    if source.is_dir():
        paths = [str(p) for p in find_media([source])]
        return paths, {p: {} for p in paths}, []
    from rosetta.data.records import read_records

    paths, extra, failed = [], {}, []
    for record in read_records(source):
        column = next((c for c in MANIFEST_COLUMNS if record.get(c) is not None), "image")
        file = record.get(column)
        if not isinstance(file, str) or "://" in file:
            missing = "a URL" if isinstance(file, str) else "embedded bytes" if file else "no image, audio or video"
            failed.append(f"{source}: record {record.get('key')!r}: no local file ({missing})")
            continue
        columns = {k: v for k, v in record.items() if k not in (*MANIFEST_COLUMNS, *FILE_KEYS, "source")}
        if file not in extra:
            paths.append(file)
        extra[file] = _jsonable(columns)
    return paths, extra, failed


def _read(path: str | os.PathLike, modality: str) -> _File:
    """A file's id, sha256 and metadata, and an image's decoded RGB pixels (a sound or video is decoded as it is
    embedded); InputError naming it if it cannot be used."""
    from PIL import Image

    from rosetta.modalities.image import load_image

    name = str(path)
    digest = hashlib.sha256()
    data = bytearray()
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            while block := f.read(1 << 20):  # a long video is hashed as it streams, never held
                digest.update(block)
                if modality == "image":
                    data += block
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror or e})") from None
    sizes = {"bytes": stat.st_size, "mtime": stat.st_mtime}
    if modality != "image":
        info = {"path": file_id(path), "media": modality, "format": Path(path).suffix.lower().lstrip(".") or None}
        return _File(name, file_id(path), digest.hexdigest(), info | sizes, modality)
    data = bytes(data)
    try:
        image = load_image(data)
    except InputError as e:
        raise InputError(f"{name}: {str(e).split(': ', 1)[-1]}") from None
    try:
        format_ = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - it decoded above; the format name is only informative
        format_ = None
    info = {"path": file_id(path), "width": image.width, "height": image.height,
            "format": format_.lower() if format_ else None, **sizes}
    return _File(name, file_id(path), digest.hexdigest(), info, modality, pixels=image)


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
