"""WebDataset tar shards: the format training streams from at scale.

Each shard holds `size` samples. A sample's members share a name (its position in the dataset,
`000000042`, so any record key is safe in a tar): the original file bytes per modality
(`000000042.jpg`), the caption (`.txt`) and the metadata with the record's key (`.json`).
`index.json` lists the shards, their sample counts and the total. Each shard is written atomically
and the index last, so an interrupted run never leaves an index that lists a partial shard.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rosetta.data.records import MODALITIES, SHARD_INDEX, Record
from rosetta.errors import InputError, RosettaError
from rosetta.files import atomic_write, write_json

SHARD_NAME = "shard-{:06d}.tar"
_PIL_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def write_shards(
    records: Iterable[Record], out: str | os.PathLike, size: int,
    on_error: Callable[[InputError], None] | None = None,
) -> dict[str, Any]:
    """Write `records` as tar shards of `size` samples into `out`; returns the index written.

    A record whose file cannot be read is passed to `on_error` and left out (without `on_error`, raised).
    """
    import webdataset as wds

    if size < 1:
        raise RosettaError(f"--size {size}: a shard needs at least 1 sample")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples(records, on_error)
    shards: list[dict[str, Any]] = []
    for first in samples:
        count = 0

        def write(f, first=first):
            nonlocal count
            writer = wds.TarWriter(f, encoder=False, mtime=0)  # fixed mtime: same input, same bytes
            try:
                for sample in chain([first], islice(samples, size - 1)):
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()  # ends the tar stream; `f` stays open for atomic_write

        name = SHARD_NAME.format(len(shards))
        atomic_write(out / name, write)
        shards.append({"name": name, "samples": count})
    index = {"format": "webdataset", "shards": shards, "total": sum(s["samples"] for s in shards)}
    write_json(out / SHARD_INDEX, index)
    return index


def _samples(records: Iterable[Record], on_error: Callable[[InputError], None] | None) -> Iterator[dict]:
    position = 0
    for record in tqdm(records, desc="shard", unit="sample", disable=None):
        try:
            sample = record_to_sample(record, f"{position:09d}")
        except InputError as e:
            if on_error is None:
                raise
            on_error(e)
            continue
        position += 1
        yield sample


def record_to_sample(record: Record, name: str) -> dict[str, Any]:
    """A record as a WebDataset sample named `name`: file bytes by suffix, `txt` caption, `json` metadata."""
    sample: dict[str, Any] = {"__key__": name}
    metadata = {"key": record["key"]}
    for field, value in record.items():
        if field in MODALITIES:
            suffix, data = _file_bytes(value, field, record["key"])
            sample[suffix] = data
        elif field == "text":
            sample["txt"] = value.encode("utf-8")
        elif field != "key":
            metadata[field] = value
    try:
        sample["json"] = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except TypeError as e:
        raise InputError(f"record {record['key']!r}: metadata is not JSON ({e})") from None
    return sample


def _file_bytes(value: str | bytes, modality: str, key: str) -> tuple[str, bytes]:
    if isinstance(value, (bytes, bytearray)):
        return _sniff_suffix(bytes(value), modality, key), bytes(value)
    if "://" in value:
        raise InputError(f"{value}: a URL; download the files first (shards hold file bytes)")
    try:
        data = Path(value).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{value}: no such file") from None
    except OSError as e:
        raise InputError(f"{value}: cannot read ({e.strerror or e})") from None
    suffix = Path(value).suffix.lower().lstrip(".")
    if not suffix:
        raise InputError(f"{value}: no file suffix to name its format by")
    return suffix, data


def _sniff_suffix(data: bytes, modality: str, key: str) -> str:
    """The suffix of an image held as bytes (re-sharding shards), from its content."""
    from PIL import Image, UnidentifiedImageError

    if modality == "image":
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format in _PIL_SUFFIX:
                    return _PIL_SUFFIX[image.format]
        except (UnidentifiedImageError, OSError):
            pass
    raise InputError(f"record {key!r}: {modality} bytes of an unknown format")
