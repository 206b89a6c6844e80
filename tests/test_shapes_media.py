"""Spoken captions and videos of the shapes: balanced, deterministic, and they say and show what they claim."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from rosetta.cli import main
from rosetta.data import shapes_media
from rosetta.data.builtin import BACKGROUNDS, CLASSES, COLORS, SPLITS, split_sizes
from rosetta.data.records import read_records
from rosetta.data.shapes_media import MOTIONS, SAMPLE_RATE, make_shape_videos, make_spoken_captions
from rosetta.data.speech import VOICES
from rosetta.errors import RosettaError
from rosetta.modalities import audio
from rosetta.modalities.video import sample_frames

SPOKEN_N = 60  # 48 training clips: each class twice
VIDEOS_N = 120  # 96 training clips: each (class, motion) pair once
SPOKEN_FIELDS = {"key", "audio", "text", "label", "voice", "speed", "pitch", "snr_db"}
VIDEO_FIELDS = {"key", "video", "text", "label", "motion", "background"}

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spoken")
    assert make_spoken_captions(out, SPOKEN_N, seed=1) == split_sizes(SPOKEN_N)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    assert make_shape_videos(out, VIDEOS_N, seed=1) == split_sizes(VIDEOS_N)
    return out


def records(root: Path, name: str, split: str) -> list[dict]:
    return list(read_records(root / f"{name}-{split}.jsonl"))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def noun(label: str) -> str:
    return ("an " if label[0] in "aeiou" else "a ") + label


def form(r: dict) -> str:
    """The caption's sentence form: its class, direction and background replaced by placeholders."""
    text = r["text"].replace(noun(r["label"]), "X").replace(f"a {r.get('background')} background", "a BG background")
    return text.replace(f"to the {r.get('motion')}", "M").replace(f" {r.get('motion')}", " M")


@needs_espeak
def test_spoken_captions_layout_and_records(spoken):
    assert json.loads((spoken / "classes.json").read_text()) == CLASSES
    for split, n in split_sizes(SPOKEN_N).items():
        rows = records(spoken, "spoken", split)
        assert [r["key"] for r in rows] == [f"spoken-{split}-{i:06d}" for i in range(n)]
        for i, r in enumerate(rows):
            assert set(r) == SPOKEN_FIELDS
            assert r["audio"] == str(spoken / "audio" / split / f"{r['key']}.wav")
            assert r["label"] == CLASSES[i % len(CLASSES)] and noun(r["label"]) in r["text"]
            assert r["voice"] in VOICES and 120 <= r["speed"] <= 200 and 25 <= r["pitch"] <= 75
            assert (r["snr_db"] is not None) == (i % 3 == 2)
            assert r["snr_db"] is None or 5 <= r["snr_db"] <= 20
    first = json.loads((spoken / "spoken-val.jsonl").read_text().splitlines()[0])
    assert first["audio"] == "audio/val/spoken-val-000000.wav"  # relative in the file
    train = records(spoken, "spoken", "train")
    assert set(Counter(r["label"] for r in train).values()) == {2}
    assert len({form(r) for r in train if "background" not in r["text"]}) >= 4  # varied sentence forms
    assert len({r["voice"] for r in train}) >= 4


@needs_espeak
def test_spoken_captions_are_16khz_speech(spoken):
    assert SAMPLE_RATE == audio.SAMPLE_RATE
    for r in records(spoken, "spoken", "test") + records(spoken, "spoken", "val"):
        info = sf.info(r["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        waveform = audio.load_audio(r["audio"])
        assert 0.5 < len(waveform) / SAMPLE_RATE < 5  # a few words
        assert np.sqrt(np.mean(waveform**2)) > 0.02


@needs_espeak
def test_noise_is_added_at_the_stated_snr(tmp_path):
    make_spoken_captions(tmp_path / "noisy", 12, seed=2)
    make_spoken_captions(tmp_path / "clean", 12, seed=2, noise=False)
    noisy = records(tmp_path / "noisy", "spoken", "train")
    clean = records(tmp_path / "clean", "spoken", "train")
    assert all(r["snr_db"] is None for r in clean)
    for i, (n, c) in enumerate(zip(noisy, clean)):
        assert n["text"] == c["text"] and n["voice"] == c["voice"]
        speech = audio.load_audio(c["audio"])
        if i % 3 != 2:
            assert Path(n["audio"]).read_bytes() == Path(c["audio"]).read_bytes()
            continue
        noise = audio.load_audio(n["audio"]) - speech
        measured = 10 * np.log10(np.mean(speech**2) / np.mean(noise**2))
        assert measured == pytest.approx(n["snr_db"], abs=0.5)


@pytest.mark.parametrize("make", [pytest.param(make_spoken_captions, marks=needs_espeak), make_shape_videos])
def test_same_seed_same_data_whatever_the_workers(tmp_path, make):
    """The same bytes, but for the videos' encoding: PyAV 18's x264 (one thread) encodes the very same frames
    a little differently in a forked worker than in the process itself, so videos are compared as decoded
    frames, which must be the same pictures within a few levels (another seed gives other pictures)."""
    make(tmp_path / "one", 12, seed=3, workers=1)
    make(tmp_path / "two", 12, seed=3, workers=2)
    make(tmp_path / "other", 12, seed=4, workers=1)
    one, two, other = (tree(tmp_path / name) for name in ("one", "two", "other"))
    assert one.keys() == two.keys() == other.keys()
    videos = [name for name in one if name.endswith(".mp4")]
    assert {k: v for k, v in one.items() if k not in videos} == {k: v for k, v in two.items() if k not in videos}
    assert one != other
    for name in videos:
        same = _frames(tmp_path / "one" / name) - _frames(tmp_path / "two" / name)
        assert np.abs(same).mean() < 2.0, name
    unlike = [np.abs(_frames(tmp_path / "one" / n) - _frames(tmp_path / "other" / n)).mean() for n in videos]
    assert not videos or min(unlike) > 5.0


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def test_missing_espeak_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RosettaError, match="espeak-ng.*apt-get install espeak-ng"):
        make_spoken_captions(tmp_path, 10)
    assert not (tmp_path / "audio").exists()


def test_videos_layout_and_records(videos):
    for split, n in split_sizes(VIDEOS_N).items():
        rows = records(videos, "videos", split)
        assert [r["key"] for r in rows] == [f"videos-{split}-{i:06d}" for i in range(n)]
        for r in rows:
            assert set(r) == VIDEO_FIELDS
            assert r["video"] == str(videos / "videos" / split / f"{r['key']}.mp4")
            assert r["label"] in CLASSES and r["motion"] in MOTIONS
            assert noun(r["label"]) in r["text"]
            words = set(r["text"].split())
            assert words & set(MOTIONS) == {r["motion"]}
    train = records(videos, "videos", "train")
    assert Counter((r["label"], r["motion"]) for r in train) == Counter(
        {(label, motion): 1 for label in CLASSES for motion in MOTIONS})
    assert len({form(r) for r in train}) >= 4  # varied sentence forms


def test_videos_are_small_h264_clips(videos):
    path = records(videos, "videos", "test")[0]["video"]
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.format.name) == ("h264", "yuv420p")
        assert (stream.width, stream.height, stream.frames, stream.average_rate) == (64, 64, 32, 8)
    assert max(p.stat().st_size for p in (videos / "videos").rglob("*.mp4")) < 20_000


def test_videos_sample_at_1_and_8_fps(videos):
    path = records(videos, "videos", "val")[0]["video"]
    assert len(sample_frames(path, fps=1)) == 4
    assert len(sample_frames(path, fps=8)) == 32  # every frame of the 4 s clip


def centroid(frame, color: str) -> np.ndarray:
    """Where the pixels near the shape's colour are (the backgrounds are greys, far from every colour)."""
    pixels = np.asarray(frame, dtype=np.int32)
    ys, xs = np.nonzero(np.abs(pixels - COLORS[color]).sum(axis=2) < 90)
    assert len(xs) > 20
    return np.array([xs.mean(), ys.mean()])


def test_the_shape_moves_the_way_the_caption_says(videos):
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    rows = records(videos, "videos", "train")[::3]
    assert {r["motion"] for r in rows} == set(MOTIONS) and {r["background"] for r in rows} == set(BACKGROUNDS)
    for r in rows:
        color = r["label"].split(" ")[0]
        centres = np.array([centroid(f, color) for f in sample_frames(r["video"], fps=1)])  # at 0.5, 1.5, ... s
        along, across = (0, 1) if steps[r["motion"]][0] else (1, 0)
        moves = np.diff(centres[:, along]) * sum(steps[r["motion"]])
        assert (moves > 1).all(), r["key"]  # steadily, the captioned way
        assert np.ptp(centres[:, across]) < 1, r["key"]  # in a straight line


def test_without_libx264_videos_are_mpeg4(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_media, "_codec", lambda: "mpeg4")
    make_shape_videos(tmp_path, 1, seed=0, image_size=32, workers=1)
    (r,) = records(tmp_path, "videos", "train")
    with av.open(r["video"]) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    centres = [centroid(f, r["label"].split(" ")[0]) for f in sample_frames(r["video"], fps=1)]
    assert len(centres) == 4


def test_video_arguments_are_checked(tmp_path):
    with pytest.raises(RosettaError, match="even"):
        make_shape_videos(tmp_path, 4, image_size=33)
    with pytest.raises(RosettaError, match="2 frames"):
        make_shape_videos(tmp_path, 4, seconds=0.1)
    with pytest.raises(RosettaError, match="--videos 0"):
        make_shape_videos(tmp_path, 0)


@needs_espeak
def test_builtin_command_writes_images_captions_and_videos(tmp_path, capsys):
    assert main(["data", "builtin", "shapes", "--n", "20", "--spoken", "10", "--videos", "10", "--out", str(tmp_path),
                 "--image-size", "32"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"wrote 20 images (16 train, 2 val, 2 test) to {tmp_path}",
        f"wrote 120 questions about them (conversations, VQA, POPE) (96 train, 12 val, 12 test) to {tmp_path}",
        f"wrote 10 spoken captions (8 train, 1 val, 1 test) to {tmp_path}",
        f"wrote 10 videos (8 train, 1 val, 1 test) to {tmp_path}",
    ]
    for split in SPLITS:
        for name in ("", "spoken-", "videos-"):
            assert (tmp_path / f"{name}{split}.jsonl").is_file()
    (video,) = records(tmp_path, "videos", "val")
    assert sample_frames(video["video"])[0].size == (32, 32)

    only = tmp_path / "videos-only"
    assert main(["data", "builtin", "shapes", "--n", "0", "--videos", "2", "--out", str(only)]) == 0
    assert not (only / "images").exists() and (only / "videos-train.jsonl").is_file()
    assert main(["data", "builtin", "speech", "--n", "2", "--videos", "2", "--out", str(only)]) == 2
    assert "shapes dataset" in capsys.readouterr().err
