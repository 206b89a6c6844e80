"""`rosetta transcribe` as a user runs it: formats, an output folder, media files, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_whisper import TINY_EN, espeak


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rosetta", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A spoken sentence as WAV, as MP3 and as the audio track of an MP4; a video without sound; a fake file."""
    import av
    import numpy as np

    from rosetta.modalities.audio import load_audio

    root = tmp_path_factory.mktemp("media")
    wav = espeak(root / "museum.wav", "The museum will be closed for renovations until next spring.")
    samples = (load_audio(wav) * 32767).astype(np.int16)
    for name, codec, video in (("museum.mp3", "mp3", False), ("museum.mp4", "aac", True), ("silent.mp4", None, True)):
        with av.open(str(root / name), "w") as container:
            picture = container.add_stream("libx264", rate=10) if video else None
            if picture is not None:
                picture.width = picture.height = 64
            sound = container.add_stream(codec, rate=16000) if codec else None
            if sound is not None:
                frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
                frame.sample_rate = 16000
                for packet in sound.encode(frame):
                    container.mux(packet)
                container.mux(sound.encode(None))
            if picture is not None:
                for _ in range(10):
                    image = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                    container.mux(picture.encode(image))
                container.mux(picture.encode(None))
    (root / "fake.wav").write_text("not audio")
    return root


def test_transcribes_wav_mp3_and_a_videos_audio_track_to_every_format(media, tmp_path):
    out = run("transcribe", "--model", str(TINY_EN), str(media / "museum.wav"), str(media / "museum.mp3"),
              str(media / "museum.mp4"), "--format", "all", "--out", str(tmp_path), "--word-timestamps")
    assert out.returncode == 0, out.stderr
    for stem in ("museum",):
        text = (tmp_path / f"{stem}.txt").read_text()
        assert "museum" in text.lower()
        assert (tmp_path / f"{stem}.srt").read_text().startswith("1\n00:00:00,000 --> ")
        assert (tmp_path / f"{stem}.vtt").read_text().startswith("WEBVTT")
        assert (tmp_path / f"{stem}.tsv").read_text().startswith("start\tend\ttext\n")
        words = [w for s in json.loads((tmp_path / f"{stem}.json").read_text())["segments"] for w in s["words"]]
        assert any("museum" in w["word"].lower() for w in words)


@pytest.mark.slow  # one more start and transcription of the real model: the default run keeps CI under 15 min
def test_prints_when_there_is_no_out_folder(media):
    out = run("transcribe", "--model", str(TINY_EN), str(media / "museum.mp4"))
    assert out.returncode == 0 and "museum" in out.stdout.lower()


def test_bad_files_are_one_line_each_and_the_others_still_transcribed(media):
    out = run("transcribe", "--model", str(TINY_EN), str(media / "silent.mp4"), str(media / "fake.wav"),
              str(media / "missing.wav"), str(media / "museum.wav"))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert any("silent.mp4: has no audio track" in line for line in lines)
    assert any("fake.wav: not an audio or video file" in line for line in lines)
    assert any("missing.wav: no such file" in line for line in lines)
    assert "Traceback" not in out.stderr and "museum" in out.stdout.lower()


def test_a_model_that_does_not_transcribe_is_exit_2(media):
    out = run("transcribe", "--model", "tiny-lm", "--random-init", str(media / "museum.wav"))
    assert out.returncode == 2 and "does not transcribe" in out.stderr


def test_tiny_whisper_runs_without_weights(media):
    out = run("transcribe", "--model", "tiny-whisper", "--random-init", str(media / "museum.wav"), "--language", "en",
              "--format", "json", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["language"] == "en"
