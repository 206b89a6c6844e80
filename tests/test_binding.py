"""Binding (ImageBind's recipe): audio and video towers trained against frozen anchors; their embeddings;
accumulation, two processes and exact resume for every pairing; the evaluation of trained and emergent pairs."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import AUDIO_TOWER, VIDEO_TOWER, hearing_model, write_video
from safetensors.torch import load_file
from test_train import assert_same_weights, losses, torchrun

import rosetta
from rosetta.errors import InputError, RosettaError
from rosetta.eval.binding import binding
from rosetta.modalities.audio import AudioSpans, load_audio
from rosetta.modalities.sniff import media_suffix, modality_of
from rosetta.models import contrastive
from rosetta.models.contrastive import ContrastiveModel
from rosetta.train.config import Pairing, load_config
from rosetta.train.trainer import train

TONES = {"low": 300, "middle": 700, "high": 1500, "shrill": 3000}
AUDIO, VIDEO = AUDIO_TOWER, VIDEO_TOWER


def fade(path: Path, direction: int, seconds: float = 2.0, rate: int = 4, tone: float | None = None) -> Path:
    """A frame fading from red to blue (direction 1) or blue to red: the same frames either way, in the
    opposite order, so that only a tower that reads their order tells the two apart. Optionally a tone."""
    frames = int(seconds * rate)
    steps = [f / max(1, frames - 1) for f in range(frames)]
    colours = [(int(220 * (1 - a) + 30 * a), 40, int(30 * (1 - a) + 220 * a)) for a in steps[:: direction]]
    return write_video(path, colours, seconds_each=1 / rate, rate=rate, tone=tone)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tones named by their pitch and squares named by their motion, and an untrained tiny model to bind to."""
    out = tmp_path_factory.mktemp("bind")
    (out / "audio").mkdir()
    (out / "video").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(64):
        name, hz = list(TONES.items())[i % 4]
        t = np.arange(int(16_000 * rng.uniform(0.4, 1.4))) / 16_000
        wave = 0.3 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(out / "audio" / f"{i}.wav", wave.astype(np.float32), 16_000)
        records.append({"key": f"tone-{i}", "audio": f"audio/{i}.wav", "text": f"a {name} tone", "label": name})
    for i in range(32):
        turning = ("blue", "red")[i % 2]
        fade(out / "video" / f"{i}.mp4", 1 if turning == "blue" else -1, seconds=float(2 + i % 3))
        records.append({"key": f"clip-{i}", "video": f"video/{i}.mp4", "text": f"the colour turning {turning}"})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Untrained, with the image tower's mean over patches (not a class token) pooled: colours embed apart.
    torch.manual_seed(0)
    base = rosetta.create("tiny")
    config = dataclasses.replace(base.config, vision=dataclasses.replace(base.config.vision, pool="mean"))
    ContrastiveModel(config).save_pretrained(out / "base")
    return out


def recipe(data: Path, out: Path, **settings) -> Path:
    values = {
        "model": str(data / "base"), "model_overrides": {"audio": AUDIO, "video": VIDEO},
        "pairings": [{"modality": "audio", "anchor": "text"}, {"modality": "video", "anchor": "text", "weight": 0.5}],
        "data": {"train": str(data / "train.jsonl"), "val": str(data / "train.jsonl"), "workers": 0},
        "out": str(out), "batch_size": 16, "epochs": 1, "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
        "device": "cpu", **settings,
    }
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def bound(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bound") / "run"
    train(load_config(recipe(data, run, epochs=16)))
    return run


def test_bound_towers_learn_while_the_anchors_stay_frozen(data, bound):
    before, after = load_file(data / "base" / "model.safetensors"), load_file(bound / "model" / "model.safetensors")
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), f"{key} moved: the anchors and their space must stay frozen"
    assert any(k.startswith("audio.") for k in after) and any(k.startswith("video.") for k in after)
    rows = [json.loads(line) for line in (bound / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {"loss/audio-text", "loss/video-text", "temperature/audio", "temperature/video"} <= train_rows[-1].keys()
    assert train_rows[-1]["loss/audio-text"] < train_rows[0]["loss/audio-text"]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["audio_to_text_recall@1"] >= 0.9  # four pitches, told apart from their spectrograms
    assert val["video_to_text_recall@1"] >= 0.9  # the order of the frames: only the temporal tower reads it
    assert "audio_to_image_top1" not in val  # emergent pairs need labelled records of both: none here

    model = rosetta.load(bound / "model")
    assert model.bound_modalities == ("audio", "video")
    probs = model.classify([data / "audio" / "0.wav", data / "audio" / "1.wav"], [f"a {n} tone" for n in TONES])
    assert probs.argmax(dim=1).tolist() == [0, 1]
    assert torch.allclose(probs.sum(dim=1), torch.ones(2))


def test_a_mean_over_frames_cannot_tell_the_order_the_temporal_tower_can(data, bound):
    """Why videos get a temporal tower: a video and its reverse have one mean frame."""
    from rosetta.modalities.video import sample_frames

    forward, backward = data / "video" / "0.mp4", data / "video" / "3.mp4"  # two seconds each, all 8 frames
    base = rosetta.load(data / "base")
    mean = [torch.nn.functional.normalize(base.embed_images(sample_frames(v, fps=4, max_frames=8)).mean(0), dim=0)
            for v in (forward, backward)]
    assert float(mean[0] @ mean[1]) > 0.99
    model = rosetta.load(bound / "model")
    texts = model.embed_texts(["the colour turning blue", "the colour turning red"])
    assert (model.embed_videos([forward, backward]) @ texts.T).argmax(dim=1).tolist() == [0, 1]


def test_accumulation_two_processes_and_resume_follow_one_trajectory(data, tmp_path):
    single = train(load_config(recipe(data, tmp_path / "single", epochs=2)))
    # Float summation orders differ, and Adam's first steps magnify the difference in gradients near zero (the
    # temporal tower's output projection starts at zero): ~2e-4 after 8 steps. Losses over the wrong batch (each
    # micro-batch or rank alone) would differ by tenths.
    train(load_config(recipe(data, tmp_path / "accum", epochs=2, accum_steps=2)))
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "single"), abs=1e-3)
    assert_same_weights(single, tmp_path / "accum" / "model", atol=5e-3)

    torchrun(recipe(data, tmp_path / "ddp", epochs=2))
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-3)
    assert_same_weights(single, tmp_path / "ddp" / "model", atol=5e-3)

    run = tmp_path / "resumed"
    config = load_config(recipe(data, run, epochs=2, checkpoint_every=3, keep_checkpoints=10))
    train(config)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    shutil.rmtree(run / "model")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "checkpoint": "step-00000003"}))
    train(config, resume=True)
    assert losses(run) == pytest.approx(losses(tmp_path / "single"), abs=1e-6)
    assert_same_weights(single, run / "model")


def test_pairings_are_checked(data, tmp_path):
    with pytest.raises(RosettaError, match="different anchor"):
        Pairing("audio", "audio")
    with pytest.raises(RosettaError, match="weight"):
        Pairing("audio", "text", weight=0)
    with pytest.raises(RosettaError, match="no audio tower"):
        train(load_config(recipe(data, tmp_path / "no-tower", model_overrides={})))
    with pytest.raises(RosettaError, match="new towers"):
        train(load_config(recipe(data, tmp_path / "bad", model_overrides={"embed_dim": 32})))
    with pytest.raises(RosettaError, match="same pairing twice"):
        load_config(recipe(data, tmp_path / "twice", pairings=[{"modality": "audio"}, {"modality": "audio"}]))


@pytest.fixture(scope="module")
def hearing(data) -> rosetta.models.contrastive.ContrastiveModel:
    from rosetta.train.trainer import with_towers

    return with_towers(rosetta.load(data / "base"), {"audio": AUDIO}).eval()


def test_audio_in_every_form_embeds_alike_and_long_clips_are_windowed(hearing, tmp_path):
    t = np.arange(16_000 * 4) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "a.wav", wave, 16_000)
    sf.write(tmp_path / "a44.flac", np.interp(np.arange(44_100 * 4) / 44_100, t, wave).astype(np.float32), 44_100)
    path, data_bytes, array = hearing.embed_audio([tmp_path / "a.wav", (tmp_path / "a.wav").read_bytes(), wave])
    assert torch.allclose(path, data_bytes) and torch.allclose(path, array, atol=1e-6)
    resampled = hearing.embed_audio(tmp_path / "a44.flac")[0]
    assert float(resampled @ path) > 0.99  # soxr's band-limited resampling: the same sound

    segments = hearing.embed_audio_segments(wave)
    assert [(s, e) for s, e, _ in segments] == [(0.0, 1.44), (1.44, 2.88), (2.88, 4.32)]  # 1.44 s windows
    mean = torch.nn.functional.normalize(torch.stack([v for _, _, v in segments]).mean(0), dim=0)
    assert torch.allclose(path, mean, atol=1e-6)


def test_videos_are_frames_pooled_and_their_sound_is_heard(data, hearing, tmp_path):
    plain = rosetta.load(data / "base")
    video = fade(tmp_path / "clip.mp4", 1, seconds=6.0)
    from rosetta.modalities.video import sample_frames

    frames = plain.embed_images(sample_frames(video, fps=1.0, max_frames=8))  # a CLIP pools the mean of 1 frame/s
    expected = torch.nn.functional.normalize(frames.mean(0), dim=0)
    assert torch.allclose(plain.embed_videos(video)[0], expected, atol=1e-5)

    segments = plain.embed_video_segments(video, window=2.0)
    assert [(s, e) for s, e, _ in segments] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    with_sound = fade(tmp_path / "tone.mp4", 1, seconds=6.0, tone=440.0)
    heard, seen = hearing.embed_videos(with_sound)[0], plain.embed_videos(with_sound)[0]
    sound = hearing.embed_audio(with_sound)[0]
    assert torch.allclose(heard, torch.nn.functional.normalize(seen + sound, dim=0), atol=1e-5)
    assert torch.allclose(hearing.embed_videos(video)[0], plain.embed_videos(video)[0], atol=1e-6)  # silent


def test_a_video_tower_reading_patches_embeds_alike_in_training_search_and_segments(tmp_path):
    """A temporal tower that reads each frame's patch tokens (where a shape is, which a pooled frame vector of a
    position-blind image tower loses): the same vectors from the training path (encode_video on pixels), from
    embed_videos and from each window of embed_video_segments; and the patches do change them."""
    from rosetta.modalities.video import sample_frames, timed_frames
    from rosetta.train.trainer import with_towers

    torch.manual_seed(0)
    model = with_towers(rosetta.create("tiny"), {"video": {**VIDEO, "patches": True}}).eval()
    torch.nn.init.normal_(model.video.proj.weight, std=0.2)  # a trained tower's residual, not the mean it starts as
    video = fade(tmp_path / "clip.mp4", 1, seconds=4.0)
    frames = sample_frames(video, VIDEO["fps"], VIDEO["max_frames"])
    with torch.inference_mode():
        trained_path = F.normalize(model.encode_video(model.preprocess(frames)[None]), dim=-1)[0]
        assert torch.allclose(model.embed_videos(video)[0], trained_path, atol=1e-5)
        segments = model.embed_video_segments(video)  # windows of max_frames / fps = 2 s
        assert [(s, e) for s, e, _ in segments] == [(0.0, 2.0), (2.0, 4.0)]
        first = [f for t, f in timed_frames(video, VIDEO["fps"], max_frames=None) if t < 2.0]
        window = F.normalize(model.encode_video(model.preprocess(first)[None]), dim=-1)[0]
        assert torch.allclose(segments[0][2], window, atol=1e-5)
        vectors, patches = model._frame_features(frames)
        blind = model._pool_frames(vectors, torch.zeros_like(patches))
        # A window of more frames than one batch of the image tower (32) is embedded in pieces, then thinned.
        long = fade(tmp_path / "long.mp4", 1, seconds=20.0)
        (_, _, whole), = model.embed_video_segments(long, window=20.0)
        every = [f for _, f in timed_frames(long, VIDEO["fps"], max_frames=None)]
        thinned = [every[i] for i in torch.linspace(0, len(every) - 1, VIDEO["max_frames"]).round().long()]
        expected = F.normalize(model.encode_video(model.preprocess(thinned)[None]), dim=-1)[0]
        assert len(every) > 32 and torch.allclose(whole, expected, atol=1e-5)
    assert not torch.allclose(blind, trained_path, atol=1e-3)


def test_a_videos_sound_is_read_window_by_window_with_the_vectors_of_the_whole_track(tmp_path, monkeypatch):
    """The windows' sound streams (in blocks narrower than a window, here) and each window's vector is what
    cutting it from the whole decoded track gives: the frames' pooled vector plus that slice's embedding."""
    hearing = hearing_model()
    video = write_video(tmp_path / "tone.mp4", [(220, 30, 30), (30, 60, 220), (30, 200, 60)], tone=440.0)
    monkeypatch.setattr(contrastive, "AudioSpans", functools.partial(AudioSpans, block_seconds=0.7))
    rows = hearing.embed_video_segments(video, window=1.5)
    assert [(s, e) for s, e, _ in rows] == [(0.0, 1.5), (1.5, 3.0), (3.0, 4.5), (4.5, 6.0)]

    rate = hearing.config.audio.sample_rate
    whole = load_audio(video, rate)
    heard = [hearing.embed_audio(whole[int(s * rate) : int(e * rate)])[0] for s, e, _ in rows]
    monkeypatch.setattr(hearing, "audio", None)  # deaf: each window's frames alone
    seen = [v for _, _, v in hearing.embed_video_segments(video, window=1.5)]
    for (_, _, vector), frames, sound in zip(rows, seen, heard):
        assert torch.equal(vector, torch.nn.functional.normalize(frames + sound, dim=-1))


def test_bad_audio_and_video_are_one_clear_error(hearing, data, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(InputError, match="junk.mp4"):
        hearing.embed_videos(junk)
    with pytest.raises(InputError, match="no audio track"):
        hearing.embed_audio(data / "video" / "0.mp4")
    with pytest.raises(InputError, match="one modality per call"):
        hearing.embed([data / "audio" / "0.wav", data / "video" / "0.mp4"])
    with pytest.raises(InputError, match="no audio tower"):
        rosetta.load(data / "base").embed_audio(data / "audio" / "0.wav")


def test_modalities_are_told_apart_by_suffix_bytes_and_shape(data):
    assert modality_of("x.wav") == modality_of("x.MP3") == "audio"
    assert modality_of("x.mp4") == "video" and modality_of("x.gif") == modality_of("x.png") == "image"
    assert modality_of((data / "audio" / "0.wav").read_bytes()) == "audio"
    assert modality_of((data / "video" / "0.mp4").read_bytes()) == "video"
    # RIFF holds more than WAV; and the suffix a sound's or video's bytes go by (an image's: none).
    assert modality_of(b"RIFF\0\0\0\0WEBPVP8 ") == "image" and modality_of(b"RIFF\0\0\0\0AVI LIST") == "video"
    assert media_suffix((data / "audio" / "0.wav").read_bytes()) == ".wav"
    assert media_suffix(b"\0\0\0\x20ftypM4A \0\0\0\0") == ".m4a" and media_suffix(b"\x89PNG\r\n\x1a\n") is None
    assert modality_of(np.zeros(16_000, np.float32)) == "audio"
    assert modality_of(np.zeros((8, 8, 3), np.uint8)) == "image"


class _Embeds:
    """Unit vectors chosen by hand, to check what the evaluation counts as a hit."""

    def __init__(self, vectors: dict):
        self.vectors = vectors

    def embed_texts(self, texts, batch_size=32):
        return torch.stack([self.vectors[t] for t in texts])

    def embed(self, sources, modality, batch_size=32, progress=None):
        return torch.stack([self.vectors[s] for s in sources])

    def embed_images(self, images, batch_size=32, progress=None):
        return self.embed(images, "image")


def test_captions_that_mean_the_same_count_and_emergent_hits_are_by_class():
    e = torch.eye(3)
    model = _Embeds({"moves left": e[0], "moving left": e[0] * 0.9 + e[1] * 0.1, "moving right": e[2],
                     "v1": e[0], "v2": e[0], "v3": e[2], "red.png": e[0], "blue.png": e[2], "a1": e[0], "red": e[0]})
    records = [
        {"video": "v1", "text": "moves left", "label": "square", "motion": "left"},
        {"video": "v2", "text": "moving left", "label": "square", "motion": "left"},
        {"video": "v3", "text": "moving right", "label": "square", "motion": "right"},
        {"image": "red.png", "text": "red", "label": "red"}, {"image": "blue.png", "text": "blue", "label": "blue"},
        {"audio": "a1", "text": "red", "label": "red"},
    ]
    metrics = binding(model, records, [Pairing("video", "text"), Pairing("audio", "text")])
    # v2 is nearest "moves left", another video's caption saying the same: a hit
    assert metrics["video_to_text_recall@1"] == 1.0 and metrics["video_text_n"] == 3
    assert metrics["audio_to_image_top1"] == 1.0  # a1 is nearest red.png, never paired with it


@pytest.mark.slow  # the whole bind quickstart on tiny data; its parts are tested one by one
def test_the_bind_quickstart_runs_end_to_end(tmp_path):
    """`rosetta quickstart --task bind` on a little data, bound to a saved (untrained) image-text model: every
    stage, the results file with trained and emergent metrics, and a model that classifies a spoken caption."""
    import subprocess
    import sys

    from rosetta.data.builtin import make_shapes

    out = tmp_path / "q"
    make_shapes(out / "data", n=240, seed=0)
    rosetta.create("tiny").save_pretrained(out / "run" / "model")
    done = subprocess.run([sys.executable, "-m", "rosetta", "quickstart", "--task", "bind", "--out", str(out),
                           "--spoken", "96", "--videos", "96", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "emergent spoken caption -> image top-1" in done.stdout and "rosetta classify --model" in done.stdout
    metrics = json.loads((out / "bind-results.json").read_text())["metrics"]
    assert {"audio_to_text_recall@1", "video_to_text_recall@1", "audio_to_image_top1", "video_to_image_top1"} <= set(
        metrics)
    model = rosetta.load(out / "bind" / "model")
    assert model.config.audio.seconds == 4.0 and model.config.video.layers == 2 and model.config.video.patches
    clip = next((out / "data" / "audio" / "test").glob("*.wav"))
    assert model.classify(clip, ["red circle", "blue square"]).shape == (1, 2)


def test_the_cli_embeds_and_classifies_sounds_and_videos_beside_images(data, bound, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "red.png")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    inputs = [str(data / "audio" / "0.wav"), str(data / "video" / "0.mp4"), str(tmp_path / "red.png"),
              str(tmp_path / "broken.wav")]
    model = str(bound / "model")
    run = subprocess.run([sys.executable, "-m", "rosetta", "classify", "--model", model, "--labels",
                          ",".join(f"a {n} tone" for n in TONES), *inputs], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1  # the broken file: one line, the others classified
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["path"] for line in lines] == inputs[:3] and lines[0]["label"] == "a low tone"
    assert run.stderr.count("\n") == 1 and "broken.wav" in run.stderr
    out = tmp_path / "vectors.npy"
    run = subprocess.run([sys.executable, "-m", "rosetta", "embed", "--model", model, "--dtype", "fp32", *inputs[:3],
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    vectors = np.load(out)
    loaded = rosetta.load(bound / "model")
    np.testing.assert_allclose(vectors[0], loaded.embed_audio(inputs[0])[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(vectors[1], loaded.embed_videos(inputs[1])[0].numpy(), atol=1e-4)


def test_audio_towers_come_by_preset_name():
    from rosetta.models.config import AUDIO_PRESETS
    from rosetta.train.trainer import with_towers

    base = rosetta.create("tiny")
    model = with_towers(base, {"audio": "ast-tiny"})
    assert model.config.audio == AUDIO_PRESETS["ast-tiny"] and model.config.audio.grid == (8, 62)  # AST's 128 x 1000
    with pytest.raises(RosettaError, match="unknown preset 'ast-huge'.*ast-small"):
        with_towers(base, {"audio": "ast-huge"})
