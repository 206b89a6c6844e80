"""`rosetta data clean`: every rejection reason on real files, the report, and an untouched source."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance

from rosetta.cli import main
from rosetta.data.clean import REASONS, CleanOptions, NearDuplicateIndex, clean, phash
from rosetta.data.records import read_records
from rosetta.errors import RosettaError
from rosetta.models.registry import create


def smooth_image(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A photo-like image: random colours at 6x6, upscaled smoothly; different seeds look different."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)


def near_copy(image: Image.Image) -> bytes:
    """The same picture, a little brighter and recompressed as JPEG: other bytes, same look."""
    buffer = io.BytesIO()
    ImageEnhance.Brightness(image).enhance(1.05).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture
def source(tmp_path) -> Path:
    """A folder with one of each problem, and captions beside the images."""
    root = tmp_path / "source"
    root.mkdir()
    captions = {}

    def add(name: str, caption: str | None = "a photo of something", image: Image.Image | None = None,
            data: bytes | None = None) -> None:
        if data is not None:
            (root / name).write_bytes(data)
        else:
            image.save(root / name)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)
            captions[name] = caption

    add("00-good.png", image=smooth_image(0))
    add("01-good.jpg", image=smooth_image(1))
    add("02-duplicate.png", data=(root / "00-good.png").read_bytes())
    add("03-near.jpg", data=near_copy(smooth_image(1)))
    buffer = io.BytesIO()
    smooth_image(2).save(buffer, "JPEG")
    add("04-truncated.jpg", data=buffer.getvalue()[:300])
    add("05-text.jpg", data=b"this is a text file, not an image")
    add("06-small.png", image=smooth_image(3, (40, 40)))
    add("07-wide.png", image=smooth_image(4, (400, 100)))
    add("08-nocaption.png", caption=None, image=smooth_image(5))
    add("09-empty-caption.png", caption="   ", image=smooth_image(6))
    add("10-long-caption.png", caption=" ".join(["word"] * 61), image=smooth_image(7))
    add("11-good.png", caption="exactly sixty words " * 15, image=smooth_image(8, (64, 180)))
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_clean_rejects_each_problem_for_its_reason(tmp_path, source):
    before = snapshot(source)
    report = clean(read_records(source), tmp_path / "out")
    assert snapshot(source) == before  # the source is read, never written

    reasons = {r["key"]: r["reason"] for r in report["rejected"]}
    assert reasons == {
        "02-duplicate.png": "duplicate",
        "03-near.jpg": "near_duplicate",
        "04-truncated.jpg": "corrupt",
        "05-text.jpg": "corrupt",
        "06-small.png": "too_small",
        "07-wide.png": "aspect_ratio",
        "08-nocaption.png": "no_caption",
        "09-empty-caption.png": "caption_too_short",
        "10-long-caption.png": "caption_too_long",
    }
    details = {r["key"]: r["detail"] for r in report["rejected"]}
    assert details["02-duplicate.png"] == "same bytes as 00-good.png"
    assert details["03-near.jpg"].endswith("bits from 01-good.jpg")
    assert details["04-truncated.jpg"].startswith(f"{source / '04-truncated.jpg'}: corrupt or truncated image")
    assert "not an image" in details["05-text.jpg"]
    assert details["07-wide.png"] == "400x100: aspect ratio 4.00 > 3.0"

    assert report["total"] == 12 and report["kept"] == 3 and report["rejected_count"] == 9
    assert report["counts"] == dict.fromkeys(REASONS, 0) | {
        "duplicate": 1, "near_duplicate": 1, "corrupt": 2, "too_small": 1, "aspect_ratio": 1, "no_caption": 1,
        "caption_too_short": 1, "caption_too_long": 1}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report

    kept = list(read_records(tmp_path / "out" / "clean.jsonl"))
    assert [r["key"] for r in kept] == ["00-good.png", "01-good.jpg", "11-good.png"]
    assert [r["image"] for r in kept] == [str(source / r["key"]) for r in kept]  # the original files
    assert kept[0]["text"] == "a photo of something"


def test_thresholds_are_options(tmp_path, source):
    options = CleanOptions(min_size=32, max_aspect=5, min_words=0, max_words=100, near_dup_threshold=-1)
    report = clean(read_records(source), tmp_path / "out", options)
    assert {r["key"]: r["reason"] for r in report["rejected"]} == {
        "02-duplicate.png": "duplicate", "04-truncated.jpg": "corrupt", "05-text.jpg": "corrupt"}


def test_missing_files_in_a_manifest_are_unreadable(tmp_path, source):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "source/00-good.png", "text": "fine"},
        {"image": "source/gone.png", "text": "the file is gone"},
        {"text": "no image at all"},
    ]))
    report = clean(read_records(manifest), tmp_path / "out")
    assert [(r["key"], r["reason"]) for r in report["rejected"]] == [("00000001", "unreadable"),
                                                                      ("00000002", "no_image")]
    assert "No such file" in report["rejected"][0]["detail"]


def test_similarity_filter_uses_the_model(tmp_path, source):
    model = create("tiny").eval()
    loose = clean(read_records(source), tmp_path / "loose", CleanOptions(min_similarity=-1), model=model, batch_size=2)
    strict = clean(read_records(source), tmp_path / "strict", CleanOptions(min_similarity=1), model=model)
    assert loose["kept"] == 3 and loose["counts"]["low_similarity"] == 0
    assert strict["kept"] == 0 and strict["counts"]["low_similarity"] == 3
    assert all(r["detail"].startswith("cosine ") for r in strict["rejected"] if r["reason"] == "low_similarity")
    # The cosine in the report is the model's.
    image = model.embed_images([str(source / "00-good.png")])
    text = model.embed_texts(["a photo of something"])
    cosine = float((image * text).sum())
    detail = next(r["detail"] for r in strict["rejected"] if r["key"] == "00-good.png")
    assert detail.startswith(f"cosine {cosine:.3f} <")


def test_clean_command(tmp_path, source, capsys):
    before = snapshot(source)
    code = main(["data", "clean", str(source), "--out", str(tmp_path / "out"), "--min-size", "32",
                 "--model", "tiny", "--random-init", "--device", "cpu", "--min-similarity", "-1"])
    assert code == 0
    assert snapshot(source) == before
    err = capsys.readouterr().err
    assert err.startswith("kept 4 of 12 (rejected: ")
    assert "duplicate 1" in err and "corrupt 2" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kept"] == 4 and report["options"]["similarity_model"] is True

    assert main(["data", "clean", str(source), "--out", str(tmp_path / "o2"), "--max-aspect", "0.5"]) == 2
    assert "--max-aspect 0.5" in capsys.readouterr().err


def test_clean_refuses_shards(tmp_path, source, capsys):
    assert main(["data", "shard", str(source), "--out", str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    assert main(["data", "clean", str(tmp_path / "shards"), "--out", str(tmp_path / "out")]) == 2
    assert "clean the source, then shard it" in capsys.readouterr().err
    with pytest.raises(RosettaError, match="clean before sharding"):
        clean(read_records(tmp_path / "shards"), tmp_path / "out")


def test_phash_matches_imagehash_definition():
    """imagehash.phash: DCT-II (scipy, unnormalised) of the 32x32 grey thumbnail, top-left 8x8 > median."""
    fftpack = pytest.importorskip("scipy.fftpack")
    for seed in range(5):
        image = smooth_image(seed, (70, 50))
        pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
        low = fftpack.dct(fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
        bits = "".join("1" if b else "0" for b in (low > np.median(low)).reshape(-1))
        assert phash(image) == int(bits, 2)


def test_phash_separates_different_images_and_joins_copies():
    hashes = [phash(smooth_image(seed)) for seed in range(30)]
    distances = [int.bit_count(a ^ b) for i, a in enumerate(hashes) for b in hashes[:i]]
    assert min(distances) > 8
    image = smooth_image(0)
    assert int.bit_count(phash(image) ^ phash(Image.open(io.BytesIO(near_copy(image))))) <= 4
    assert int.bit_count(phash(image) ^ phash(image.resize((150, 150), Image.Resampling.BICUBIC))) <= 2


@settings(max_examples=60, deadline=None)
@given(threshold=st.integers(0, 12), seed=st.integers(0, 2**32 - 1))
def test_near_duplicate_index_finds_what_a_full_scan_finds(threshold, seed):
    rng = random.Random(seed)
    stored = [rng.getrandbits(64) for _ in range(40)]
    # Queries close to stored hashes (flip a few bits) and random ones.
    queries = [h ^ sum(1 << b for b in rng.sample(range(64), rng.randint(0, 14))) for h in stored[:20]]
    queries += [rng.getrandbits(64) for _ in range(10)]
    index = NearDuplicateIndex(threshold)
    for i, h in enumerate(stored):
        index.add(h, str(i))
    for q in queries:
        best = min((int.bit_count(q ^ h), i) for i, h in enumerate(stored))
        found = index.find(q)
        if best[0] <= threshold:
            assert found is not None and found[1] == best[0]
            assert int.bit_count(q ^ stored[int(found[0])]) == best[0]
        else:
            assert found is None


def test_options_are_checked():
    for bad in (dict(min_size=0), dict(max_aspect=0.9), dict(min_words=5, max_words=2), dict(near_dup_threshold=64),
                dict(min_similarity=2)):
        with pytest.raises(RosettaError):
            CleanOptions(**bad)


def test_unreadable_file_permissions(tmp_path, source):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    (source / "00-good.png").chmod(0)
    try:
        report = clean(read_records(source), tmp_path / "out")
    finally:
        (source / "00-good.png").chmod(0o644)
    assert report["rejected"][0]["reason"] == "unreadable"
