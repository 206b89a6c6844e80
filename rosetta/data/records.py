"""One record schema for every data source, and the readers that produce it.

A record is a flat dict:

- ``"key"``: a string, unique within its source;
- a field per file modality (``"image"``, later ``"audio"``, ``"video"``): an absolute path, or the
  file's bytes when it was read from a tar shard (a `ShardMember`, read on demand, with ``lazy=True``);
- ``"text"``: the caption;
- any other keys: free metadata (labels, ids, scores...).

`read_records(source)` reads a folder of files with same-stem captions, a manifest (.csv, .tsv,
.jsonl, .parquet) or a folder of WebDataset shards written by `rosetta data shard`.
`write_manifest(records, path)` writes .jsonl or .parquet with paths relative to the manifest.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosetta.errors import InputError, RosettaError
from rosetta.files import atomic_write
from rosetta.modalities.image import IMAGE_SUFFIXES

# Fields that hold a file: a path relative to the manifest in a manifest, absolute in a record.
MODALITIES = ("image", "audio", "video")

# File suffixes each modality is recognised by in folders and tar shards.
MODALITY_SUFFIXES: dict[str, frozenset[str]] = {
    "image": frozenset(IMAGE_SUFFIXES),
    "audio": frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}),
    "video": frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi"}),
}
SUFFIX_MODALITY = {suffix: modality for modality, suffixes in MODALITY_SUFFIXES.items() for suffix in suffixes}

TEXT_ALIASES = ("text", "caption")  # manifest columns read as the caption, in order of preference
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
SHARD_INDEX = "index.json"  # marks a folder of shards written by `rosetta data shard`

Record = dict[str, Any]


def holds(record: Record, modality: str) -> bool:
    """Whether `record` has `modality` ("text": a non-empty caption; a file modality: a file)."""
    return bool(record.get("text")) if modality == "text" else record.get(modality) is not None


def read_records(source: str | os.PathLike, lazy: bool = False) -> Iterator[Record]:
    """Records from a folder of files, a manifest, or a folder of WebDataset shards (detected from `source`).

    The kind of source is checked now; its content as it is read (a RosettaError names the problem).
    `lazy`: shard members hold a `ShardMember` (where the file lies in its tar) instead of its bytes, so a
    shard set larger than memory can be listed and read sample by sample (training does this).
    """
    path = Path(source)
    if not path.exists():
        raise RosettaError(f"{source}: no such file or directory")
    if path.is_dir():
        if (path / SHARD_INDEX).is_file():
            return _list_shards(path) if lazy else _read_shards(path)
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise RosettaError(
            f"{source}: unknown source (expected a folder, or a manifest ending in {', '.join(MANIFEST_SUFFIXES)})"
        )
    return _read_manifest(path, suffix)


# Folders: every file of a known modality, captioned by a same-stem .txt or .json beside it.


def _read_folder(root: Path) -> Iterator[Record]:
    found = False
    for path in sorted(_visible_files(root), key=lambda p: p.relative_to(root).as_posix()):
        modality = SUFFIX_MODALITY.get(path.suffix.lower())
        if modality is None:
            continue
        found = True
        record: Record = {"key": path.relative_to(root).as_posix(), modality: str(path.absolute())}
        caption, metadata = _sidecar(path)
        if caption is not None:
            record["text"] = caption
        for name, value in metadata.items():
            record.setdefault(name, value)
        yield record
    if not found:
        raise RosettaError(f"{root}: no image, audio or video files in this folder")


def _visible_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield Path(directory, name)


def _sidecar(path: Path) -> tuple[str | None, dict[str, Any]]:
    """The caption and metadata of `path` from `<stem>.txt` (caption) and/or `<stem>.json`."""
    caption, metadata = None, {}
    txt = path.with_suffix(".txt")
    if txt.is_file():
        caption = _read_text(txt).strip()
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(_read_text(sidecar))
        except json.JSONDecodeError as e:
            raise RosettaError(f"{sidecar}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise RosettaError(f"{sidecar}: expected a JSON object with a \"caption\" key")
        alias = next((a for a in TEXT_ALIASES if isinstance(data.get(a), str)), None)
        if alias is not None:
            text = data.pop(alias)
            caption = text if caption is None else caption  # a .txt beside it wins
        metadata = {k: v for k, v in data.items() if k != "key" and k not in MODALITIES}
    return caption, metadata


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RosettaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# Manifests: a row per record, a column per modality (paths relative to the manifest), text, metadata.


def _read_manifest(path: Path, suffix: str) -> Iterator[Record]:
    rows = {".csv": _csv_rows, ".tsv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows,
            ".parquet": _parquet_rows}[suffix](path)
    base = os.path.dirname(os.path.abspath(path))
    seen: set[str] = set()
    text_column = None
    for index, (where, row) in enumerate(rows):
        if text_column is None:  # the first row (every column, with None where empty) decides the layout
            text_column = next((c for c in TEXT_ALIASES if c in row), "")
            if not text_column and not any(m in row for m in MODALITIES):
                raise RosettaError(
                    f"{path}: no {', '.join(MODALITIES)} or text column (found: {', '.join(map(str, row)) or 'none'})"
                )
        record = _row_to_record(row, index, text_column, base, f"{path}:{where}")
        if record["key"] in seen:
            raise RosettaError(f"{path}:{where}: duplicate key {record['key']!r}")
        seen.add(record["key"])
        yield record


def _row_to_record(row: dict[str, Any], index: int, text_column: str, base: str, where: str) -> Record:
    """Missing values (None) of file and text columns leave the field out; metadata keeps them."""
    key = row.get("key")
    record: Record = {"key": f"{index:08d}" if key is None else str(key)}
    for modality in MODALITIES:
        if row.get(modality) is not None:
            record[modality] = _resolve(row[modality], base, f"{where}: {modality}")
    if text_column and row.get(text_column) is not None:
        text = row[text_column]
        if not isinstance(text, str):
            raise RosettaError(f"{where}: {text_column} must be a string, got {type(text).__name__}")
        record["text"] = text
    for name, value in row.items():
        if name not in ("key", text_column, *MODALITIES):
            record[name] = value
    return record


def _resolve(value: Any, base: str, where: str) -> str | bytes:
    """A manifest's file reference as a record holds it: an absolute path, a URL as it is, or bytes."""
    if isinstance(value, dict):  # Hugging Face datasets' parquet layout: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise RosettaError(f"{where}: expected a file path, got {value!r}")
    if "://" in value:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """CSV (quoted as the csv module and spreadsheets write it) or TSV (a line per row, no quoting).

    An empty cell is a missing value.
    """
    tsv = path.suffix.lower() == ".tsv"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise RosettaError(f"{path}: empty manifest (expected a header line)")
            header = [name.strip() for name in header]
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise RosettaError(
                        f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}"
                    )
                yield str(reader.line_num), {name: value or None for name, value in zip(header, row)}
        except csv.Error as e:
            raise RosettaError(f"{path}:{reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise RosettaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RosettaError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise RosettaError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield str(number), row
        except UnicodeDecodeError as e:
            raise RosettaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON array of objects: LLaVA's instruction data (llava_v1_5_mix665k.json and its kin)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RosettaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RosettaError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise RosettaError(f"{path}: expected a JSON array of objects (one per record), got {type(rows).__name__}")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RosettaError(f"{path}[{number}]: expected a JSON object, got {type(row).__name__}")
        yield f"[{number}]", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RosettaError(f"{path}: not a readable parquet file ({e})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", row


# Shards: WebDataset tars, one sample per record: KEY.<suffix> files, KEY.txt caption, KEY.json metadata.


@dataclass(frozen=True)
class ShardMember:
    """A file inside a tar shard, read when needed: what lazily listed records hold instead of its bytes."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as e:
            raise InputError(f"{self.shard}: {e.strerror or e}") from None
        if len(data) != self.size:
            raise InputError(f"{self.shard}: truncated (a member at byte {self.offset} ends past the file)")
        return data


def _shard_paths(root: Path) -> list[Path]:
    try:
        index = json.loads((root / SHARD_INDEX).read_text(encoding="utf-8"))
        names = [shard["name"] for shard in index["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RosettaError(f"{root / SHARD_INDEX}: not a shard index written by `rosetta data shard` ({e})") from None
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise RosettaError(f"{root}: shard {missing[0]} is listed in {SHARD_INDEX} but missing")
    return [root / name for name in names]


def _read_shards(root: Path) -> Iterator[Record]:
    import webdataset as wds

    paths = _shard_paths(root)
    if not paths:
        return
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, nodesplitter=None,
                             workersplitter=None, empty_check=False)
    for sample in dataset:
        yield sample_to_record(sample)


# WebDataset's grouping: a member's key is its path up to the first dot of its file name, the rest its suffix.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _list_shards(root: Path) -> Iterator[Record]:
    """The records of the shards as `_read_shards` gives them, with `ShardMember`s for the files: only the tar
    headers and the small caption and metadata members are read."""
    for path in _shard_paths(root):
        sample: dict[str, Any] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    found = _KEY_SUFFIX.match(member.name) if member.isfile() else None
                    if found is None:
                        continue
                    key, suffix = found.group(1), found.group(2).lower()  # as WebDataset does
                    if sample and sample["__key__"] != key:
                        yield sample_to_record(sample)
                        sample = {}
                    sample["__key__"] = key
                    if "." + suffix in SUFFIX_MODALITY:
                        sample[suffix] = ShardMember(str(path), member.offset_data, member.size)
                    else:
                        sample[suffix] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise RosettaError(f"{path}: not a readable tar shard ({e})") from None
        if sample:
            yield sample_to_record(sample)


def sample_to_record(sample: dict[str, Any]) -> Record:
    """A WebDataset sample (undecoded: member suffix -> bytes, or a ShardMember) as a record."""
    metadata = json.loads(sample["json"]) if "json" in sample else {}
    record: Record = {"key": str(metadata.pop("key", sample["__key__"]))}
    for suffix, value in sample.items():
        modality = SUFFIX_MODALITY.get("." + suffix)
        if modality is not None:
            record[modality] = value if isinstance(value, ShardMember) else bytes(value)
    if "txt" in sample:
        record["text"] = bytes(sample["txt"]).decode("utf-8")
    record.update(metadata)
    return record


# Writing manifests.


def write_manifest(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records to a .jsonl or .parquet manifest in one atomic step; returns how many were written.

    File paths are written relative to the manifest's folder, so the folder can move with its files.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise RosettaError(f"{path}: write a .jsonl or .parquet manifest")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.dirname(os.path.abspath(path))
    rows = (_record_to_row(record, base, suffix == ".jsonl") for record in records)
    count = 0
    if suffix == ".jsonl":
        def write(f):
            nonlocal count
            text = io.TextIOWrapper(f, encoding="utf-8", newline="\n")
            for row in rows:
                text.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            text.flush()
            text.detach()  # leave `f` open for atomic_write to sync and close
        atomic_write(path, write)
        return count
    return _write_parquet(list(rows), path)


def _record_to_row(record: Record, base: str, jsonl: bool) -> Record:
    row = dict(record)
    for modality in MODALITIES:
        value = row.get(modality)
        if isinstance(value, str) and "://" not in value and os.path.isabs(value):
            try:
                row[modality] = Path(os.path.relpath(value, base)).as_posix()
            except ValueError:  # another drive on Windows: keep it absolute
                pass
        elif isinstance(value, (bytes, bytearray)) and jsonl:
            raise RosettaError(
                f"record {row.get('key')!r}: {modality} holds bytes, which JSON cannot; write .parquet instead"
            )
    return row


def _write_parquet(rows: list[Record], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(name for row in rows for name in row))
    try:
        table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RosettaError(f"{path}: records do not fit one table ({e})") from None
    atomic_write(path, lambda f: pq.write_table(table, f))
    return len(rows)
