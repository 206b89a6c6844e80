"""Records from every kind of source: folders with captions, manifests, WebDataset shards; and back out."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rosetta.cli import main
from rosetta.data.records import ShardMember, read_records, write_manifest
from rosetta.data.shard import write_shards
from rosetta.errors import InputError, RosettaError


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    save_image(root / "a.jpg", 0)
    (root / "a.txt").write_text("a red circle\n", encoding="utf-8")
    save_image(root / "nested" / "b.png", 1)
    (root / "nested" / "b.json").write_text(json.dumps({"caption": "ein Hund 🐕", "license": "cc-by", "score": 0.5}))
    save_image(root / "c.webp", 2)  # no caption
    (root / "notes.md").write_text("ignored")
    (root / "orphan.txt").write_text("a caption without an image")
    return root


def test_folder_pairs_images_with_same_stem_captions(folder):
    records = list(read_records(folder))
    assert [r["key"] for r in records] == ["a.jpg", "c.webp", "nested/b.png"]
    a, c, b = records
    assert a == {"key": "a.jpg", "image": str(folder / "a.jpg"), "text": "a red circle"}
    assert b == {"key": "nested/b.png", "image": str(folder / "nested" / "b.png"), "text": "ein Hund 🐕",
                 "license": "cc-by", "score": 0.5}
    assert c == {"key": "c.webp", "image": str(folder / "c.webp")}
    assert all(Path(r["image"]).is_absolute() for r in records)


def test_manifests_resolve_paths_against_their_folder(tmp_path, folder):
    rows = [
        {"key": "one", "image": "photos/a.jpg", "caption": "first, with a comma", "label": "x"},
        {"key": "two", "image": "photos/nested/b.png", "caption": 'second "quoted"', "label": "y"},
    ]
    expected = [
        {"key": "one", "image": str(folder / "a.jpg"), "text": "first, with a comma", "label": "x"},
        {"key": "two", "image": str(folder / "nested" / "b.png"), "text": 'second "quoted"', "label": "y"},
    ]
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "m.tsv").write_text(
        "key\timage\tcaption\tlabel\n" + "".join("\t".join(r.values()) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ("m.csv", "m.tsv", "m.jsonl", "m.parquet"):
        assert list(read_records(tmp_path / name)) == expected, name


def test_manifest_details(tmp_path, folder):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.jsonl"
    lines = [
        {"image": "../photos/a.jpg", "text": "a", "caption": "kept as metadata: text wins", "audio": None},
        {"image": str(folder / "c.webp"), "text": None, "extra": None},  # absolute path, no text
        {"image": "https://example.com/x.jpg", "text": "a URL is kept as it is"},
        {"text": "text only", "video": "clips/v.mp4"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    records = list(read_records(manifest))
    assert [r["key"] for r in records] == ["00000000", "00000001", "00000002", "00000003"]
    assert records[0] == {"key": "00000000", "image": str(folder / "a.jpg"), "text": "a",
                          "caption": "kept as metadata: text wins"}
    assert records[1] == {"key": "00000001", "image": str(folder / "c.webp"), "extra": None}
    assert records[2]["image"] == "https://example.com/x.jpg"
    assert records[3] == {"key": "00000003", "video": str(tmp_path / "sub" / "clips" / "v.mp4"), "text": "text only"}


def test_parquet_may_hold_image_bytes(tmp_path, folder):
    data = (folder / "a.jpg").read_bytes()
    pq.write_table(pa.Table.from_pylist([{"image": data, "text": "raw bytes"}]), tmp_path / "raw.parquet")
    pq.write_table(pa.Table.from_pylist([  # as Hugging Face datasets write an Image column
        {"image": {"bytes": data, "path": "a.jpg"}, "text": "bytes in the struct"},
        {"image": {"bytes": None, "path": "photos/a.jpg"}, "text": "a path in the struct"},
    ]), tmp_path / "hf.parquet")
    records = [*read_records(tmp_path / "raw.parquet"), *read_records(tmp_path / "hf.parquet")]
    assert [r["image"] for r in records] == [data, data, str(folder / "a.jpg")]
    records = [dict(r, key=str(i)) for i, r in enumerate(records[:2])]  # keys are unique within one source
    write_manifest(records, tmp_path / "copy.parquet")
    assert list(read_records(tmp_path / "copy.parquet")) == records


def test_empty_csv_cells_are_missing(tmp_path):
    (tmp_path / "m.csv").write_text("image,text,label\na.jpg,,\n,only text,x\n")
    assert list(read_records(tmp_path / "m.csv")) == [
        {"key": "00000000", "image": str(tmp_path / "a.jpg"), "label": None},
        {"key": "00000001", "text": "only text", "label": "x"},
    ]


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "no such file"),
    ("data.txt", "hello", "unknown source"),
    ("m.csv", "path,label\na.jpg,dog\n", "no image, audio, video or text column (found: path, label)"),
    ("m.jsonl", '{"path": "a.jpg"}\n', "no image, audio, video or text column"),
    ("m.jsonl", '{"image": "a.jpg"}\nnot json\n', "m.jsonl:2: not valid JSON"),
    ("m.jsonl", '{"image": "a.jpg", "key": "k"}\n{"image": "b.jpg", "key": "k"}\n', "duplicate key 'k'"),
    ("m.jsonl", '{"image": 5}\n', "expected a file path"),
    ("m.csv", "image,text\na.jpg,x,extra\n", "3 fields where the header has 2"),
    ("m.csv", "", "empty manifest"),
    ("m.parquet", "not parquet", "not a readable parquet file"),
    ("empty", "", "no image, audio or video files"),
])
def test_bad_sources_raise_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "empty":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RosettaError, match=re.escape(message)) as e:
        list(read_records(path))
    assert "\n" not in str(e.value)


def test_bad_caption_sidecar_names_the_file(tmp_path):
    save_image(tmp_path / "x.jpg")
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(RosettaError, match=r"x\.json: not valid JSON"):
        list(read_records(tmp_path))


def test_write_manifest_round_trips_with_relative_paths(tmp_path, folder):
    records = list(read_records(folder))
    records[0]["shapes"] = [{"shape": "circle", "x": 3}]
    for name in ("out/m.jsonl", "out/m.parquet"):
        assert write_manifest(records, tmp_path / name) == len(records)
        assert [{k: v for k, v in r.items() if v is not None} for r in read_records(tmp_path / name)] == records
    first = json.loads((tmp_path / "out" / "m.jsonl").read_text().splitlines()[0])
    assert first["image"] == "../photos/a.jpg"
    with pytest.raises(RosettaError, match="write a .jsonl or .parquet"):
        write_manifest(records, tmp_path / "m.csv")
    with pytest.raises(RosettaError, match="holds bytes"):
        write_manifest([{"key": "k", "image": b"\x89PNG"}], tmp_path / "bytes.jsonl")
    assert not (tmp_path / "bytes.jsonl").exists()  # nothing half-written


def test_shards_round_trip(tmp_path, folder):
    records = list(read_records(folder))
    records[2]["shapes"] = [{"shape": "star"}]
    index = write_shards(records, tmp_path / "shards", size=2)
    assert index == {"format": "webdataset", "total": 3, "shards": [
        {"name": "shard-000000.tar", "samples": 2}, {"name": "shard-000001.tar", "samples": 1}]}
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.json", "000000000.txt", "000000001.json",
                                  "000000001.webp"]
    back = list(read_records(tmp_path / "shards"))
    assert [r["key"] for r in back] == [r["key"] for r in records]
    for original, restored in zip(records, back):
        assert restored["image"] == Path(original["image"]).read_bytes()
        assert {k: v for k, v in restored.items() if k != "image"} == {
            k: v for k, v in original.items() if k != "image"}
    # Shards re-shard: image bytes keep their format.
    write_shards(back, tmp_path / "again", size=10)
    assert list(read_records(tmp_path / "again")) == back
    # Listed lazily (as training does): the same records, files left in the tar until read.
    lazy = list(read_records(tmp_path / "shards", lazy=True))
    assert all(isinstance(r["image"], ShardMember) for r in lazy)
    assert [{**r, "image": r["image"].read()} for r in lazy] == back


def test_lazy_listing_reads_foreign_shards_as_webdataset_does(tmp_path, folder):
    """A shard from another tool: upper-case suffixes, nested member paths."""
    (tmp_path / "shards").mkdir()
    jpeg = Path(next(read_records(folder))["image"]).read_bytes()
    with tarfile.open(tmp_path / "shards" / "x.tar", "w") as tar:
        for name, data in [("dir/a.JPG", jpeg), ("dir/a.txt", b"a caption"), ("dir/b.jpg", jpeg)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shards" / "index.json").write_text(json.dumps({"shards": [{"name": "x.tar", "samples": 2}]}))
    eager = list(read_records(tmp_path / "shards"))
    lazy = [{**r, "image": r["image"].read()} for r in read_records(tmp_path / "shards", lazy=True)]
    assert lazy == eager and [r["key"] for r in eager] == ["dir/a", "dir/b"] and eager[0]["text"] == "a caption"


def test_a_truncated_shard_member_is_an_input_error(tmp_path, folder):
    write_shards(list(read_records(folder)), tmp_path / "shards", size=10)
    member = next(read_records(tmp_path / "shards", lazy=True))["image"]
    shard = Path(member.shard)
    shard.write_bytes(shard.read_bytes()[: member.offset + 10])
    with pytest.raises(InputError, match="truncated"):
        member.read()


def test_shard_leaves_out_unreadable_files(tmp_path, folder):
    records = [*read_records(folder), {"key": "gone", "image": str(tmp_path / "gone.jpg"), "text": "x"}]
    errors = []
    index = write_shards(records, tmp_path / "shards", size=10, on_error=errors.append)
    assert index["total"] == 3
    assert [str(e) for e in errors] == [f"{tmp_path / 'gone.jpg'}: no such file"]
    with pytest.raises(InputError, match="no such file"):
        write_shards(records, tmp_path / "strict", size=10)


def test_shard_command(tmp_path, folder, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "photos/a.jpg", "text": "a"}) + "\n"
                        + json.dumps({"image": "photos/missing.jpg", "text": "b"}) + "\n")
    assert main(["data", "shard", str(manifest), "--out", str(tmp_path / "s"), "--size", "5"]) == 1
    err = capsys.readouterr().err
    assert f"rosetta: {tmp_path / 'photos' / 'missing.jpg'}: no such file" in err
    assert "wrote 1 samples in 1 shards" in err
    assert main(["data", "shard", str(folder), "--out", str(tmp_path / "s2"), "--size", "2"]) == 0
    assert json.loads((tmp_path / "s2" / "index.json").read_text())["total"] == 3
    assert capsys.readouterr().err == f"wrote 3 samples in 2 shards to {tmp_path / 's2'}\n"
    assert main(["data", "shard", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "s3")]) == 2
    assert capsys.readouterr().err.strip() == f"rosetta: {tmp_path / 'nope.csv'}: no such file or directory"
    assert main(["data", "shard", str(folder), "--out", str(tmp_path / "s4"), "--size", "0"]) == 2


# Property tests: any caption text survives the manifest formats that can hold it.

captions = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(texts=st.lists(captions, min_size=1, max_size=5), labels=st.lists(st.text(max_size=10), min_size=5))
def test_jsonl_and_parquet_keep_any_text(tmp_path, texts, labels):
    records = [{"key": f"k{i}", "image": str(tmp_path / f"{i}.jpg"), "text": t, "label": label}
               for i, (t, label) in enumerate(zip(texts, labels))]
    for name in ("p.jsonl", "p.parquet"):
        write_manifest(records, tmp_path / name)
        assert list(read_records(tmp_path / name)) == records


@SETTINGS
@given(texts=st.lists(captions.filter(lambda t: "\r" not in t), min_size=1, max_size=5))
def test_csv_keeps_any_text(tmp_path, texts):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "text"])
    writer.writerows([f"{i}.jpg", t] for i, t in enumerate(texts))
    (tmp_path / "p.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
    assert [r["text"] for r in read_records(tmp_path / "p.csv")] == texts


@SETTINGS
@given(texts=st.lists(captions.filter(lambda t: not set(t) & {"\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d",
                                                                 "\x1e", "\x85", "\u2028", "\u2029"}),
                      min_size=1, max_size=5))
def test_tsv_keeps_any_single_line_text(tmp_path, texts):
    content = "image\ttext\n" + "".join(f"{i}.jpg\t{t}\n" for i, t in enumerate(texts))
    (tmp_path / "p.tsv").write_text(content, encoding="utf-8", newline="")
    assert [r["text"] for r in read_records(tmp_path / "p.tsv")] == texts
