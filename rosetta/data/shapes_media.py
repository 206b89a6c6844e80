"""Spoken captions and short videos for the built-in shapes dataset: the audio and video sides of its classes.

They exist to bind audio and video towers to an image-text CLIP trained on the shapes images (as ImageBind
binds its towers to images), then to score what the binding gives for free: spoken caption -> image
retrieval over the 24 shape-and-colour classes, and video -> text retrieval of motion captions.

Spoken captions: a short sentence naming one class ("a photo of a red circle"), spoken by espeak-ng in
varied voices, speeds and pitches, every third over white noise, resampled to 16 kHz. Videos: one shape,
drawn as the images draw it on the same backgrounds, moving in a straight line across the frame to the
left, right, up or down, captioned with its colour, shape and direction ("a red circle moving to the left").

    OUT/audio/<split>/spoken-<split>-000000.wav   16 kHz mono, 16-bit PCM
    OUT/spoken-<split>.jsonl    {"key", "audio", "text", "label", "voice", "speed", "pitch", "snr_db"}
    OUT/videos/<split>/videos-<split>-000000.mp4  H.264 (MPEG-4 part 2 where FFmpeg lacks libx264), yuv420p
    OUT/videos-<split>.jsonl    {"key", "video", "text", "label", "motion", "background"}
    OUT/classes.json            the class names, as `make_shapes` writes them

Both sit beside the images in one folder; splits are 80/10/10 as the images'. Labels cycle through the
classes (videos through every class and motion pair), so a split holds as many of each as its size allows.
Same arguments, same bytes, whatever the number of worker processes: each clip draws from its own
generator, seeded by (seed, split, position); espeak-ng and the encoders are deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rosetta.data.builtin import (
    BACKGROUNDS,
    CLASSES,
    SINGLE_SIDES,
    SPLITS,
    _background,
    _noun,
    _paint,
    _style,
    default_workers,
    map_jobs,
    split_sizes,
)
from rosetta.data.records import write_manifest
from rosetta.data.speech import VOICES, find_espeak, over_noise, speak
from rosetta.errors import RosettaError
from rosetta.files import write_json

SAMPLE_RATE = 16_000  # the rate the audio towers read (rosetta.modalities.audio.SAMPLE_RATE)
SPOKEN_CAPTIONS = (
    "{x}",
    "a photo of {x}",
    "a picture of {x}",
    "there is {x}",
    "this is {x}",
    "{x} on a {bg} background",
)
MOTIONS = ("left", "right", "up", "down")
VIDEO_CAPTIONS = (
    "{x} moving {way}",
    "{x} moves {motion}",
    "{x} going {way}",
    "{x} sliding {way}",
    "a video of {x} moving {way}",
    "{x} on a {bg} background moving {way}",
)
_WAYS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# One thread each: the output then depends on the frames alone, and the pool already keeps the CPUs busy. mpeg4
# gets a fixed quantiser (ffmpeg's -q:v 3; 118 is FFmpeg's FF_QP2LAMBDA): its rate control starves frames this
# small, washing their colours out.
_ENCODER_OPTIONS = {"libx264": {"threads": "1"},
                    "mpeg4": {"threads": "1", "flags": "+qscale", "global_quality": str(3 * 118)}}
_CLIPS_PER_WORKER = 50  # a second or two of work each: fewer clips than that are made faster without a pool


def make_spoken_captions(out: str | os.PathLike, n: int, seed: int = 0, noise: bool = True,
                         workers: int | None = None) -> dict[str, int]:
    """Write `n` spoken class captions to `out` (audio/<split>/*.wav, spoken-<split>.jsonl); returns split sizes.

    Within a split, position i names CLASSES[i % 24] in a voice (speech.VOICES), speed (120-200 words a
    minute) and pitch (25-75) of its own; with `noise`, every third clip is over white noise 5-20 dB down.
    """
    if n < 1:
        raise RosettaError(f"--spoken {n}: need at least 1 caption")
    espeak = find_espeak("the spoken captions")
    out = Path(out)
    sizes = split_sizes(n)
    jobs = []
    for split in SPLITS:
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(out, espeak, seed, split, i, noise and i % 3 == 2) for i in range(sizes[split])]
    workers = default_workers(n, _CLIPS_PER_WORKER) if workers is None else workers
    records = map_jobs(_write_clip, jobs, workers, "spoken captions", "clip")
    _write_manifests(out, "spoken", records)
    return sizes


def make_shape_videos(out: str | os.PathLike, n: int, seed: int = 0, image_size: int = 64, seconds: float = 4.0,
                      fps: int = 8, workers: int | None = None) -> dict[str, int]:
    """Write `n` videos of a moving shape to `out` (videos/<split>/*.mp4, videos-<split>.jsonl); returns split sizes.

    Within a split, position i shows CLASSES[i % 24] moving MOTIONS[(i // 24) % 4], so every (class,
    motion) pair comes up equally often; each clip is `seconds` long at `fps` frames a second.
    """
    if n < 1:
        raise RosettaError(f"--videos {n}: need at least 1 video")
    if image_size < 16 or image_size % 2:
        raise RosettaError(f"--image-size {image_size}: videos need an even size of at least 16 pixels")
    frames = round(seconds * fps)
    if fps < 1 or frames < 2:
        raise RosettaError(f"{seconds:g} s at {fps} fps: a video needs at least 2 frames to show motion")
    out = Path(out)
    sizes = split_sizes(n)
    codec = _codec()
    jobs = []
    for split in SPLITS:
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(out, seed, image_size, frames, fps, codec, split, i) for i in range(sizes[split])]
    workers = default_workers(n, _CLIPS_PER_WORKER) if workers is None else workers
    records = map_jobs(_write_video, jobs, workers, "shape videos", "video")
    _write_manifests(out, "videos", records)
    return sizes


def _write_manifests(out: Path, name: str, records: list[dict[str, Any]]) -> None:
    for split in SPLITS:
        write_manifest((r for r in records if r["key"].startswith(f"{name}-{split}-")), out / f"{name}-{split}.jsonl")
    write_json(out / "classes.json", CLASSES)


def _write_clip(job: tuple[Path, str, int, str, int, bool]) -> dict[str, Any]:
    import soundfile as sf
    import soxr

    out, espeak, seed, split, i, noisy = job
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    key = f"spoken-{split}-{i:06d}"
    label = CLASSES[i % len(CLASSES)]
    form = SPOKEN_CAPTIONS[rng.integers(len(SPOKEN_CAPTIONS))]
    text = form.format(x=_noun(*label.split(" ")), bg=rng.choice(list(BACKGROUNDS)))
    voice = VOICES[rng.integers(len(VOICES))]
    speed, pitch = int(rng.integers(120, 201)), int(rng.integers(25, 76))
    samples, rate = speak(espeak, text, voice, speed, pitch)
    samples = soxr.resample(samples, rate, SAMPLE_RATE)
    snr = round(float(rng.uniform(5, 20)), 1) if noisy else None
    if snr is not None:  # at 16 kHz, so the noise is white over the whole band the towers hear
        samples = over_noise(rng, samples, snr)
    # Resampling can overshoot full scale a little; 16-bit PCM must not wrap around.
    sf.write(out / "audio" / split / f"{key}.wav", np.clip(samples, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    return {"key": key, "audio": f"audio/{split}/{key}.wav", "text": text, "label": label, "voice": voice,
            "speed": speed, "pitch": pitch, "snr_db": snr}


def _write_video(job: tuple[Path, int, int, int, int, str, str, int]) -> dict[str, Any]:
    out, seed, size, frames, fps, codec, split, i = job
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    key = f"videos-{split}-{i:06d}"
    label = CLASSES[i % len(CLASSES)]
    motion = MOTIONS[(i // len(CLASSES)) % len(MOTIONS)]
    color, shape = label.split(" ")
    bg = str(rng.choice(list(BACKGROUNDS)))
    background = _background(rng, bg, size)
    side = int(rng.integers(int(SINGLE_SIDES[0] * size), int(SINGLE_SIDES[1] * size) + 1))
    spec = {"shape": shape, "color": color, "size": side}
    angle, tint = _style(spec, rng)  # drawn once: the shape keeps its tilt and colour as it moves
    images = []
    for x, y in _path(rng, size, side, motion, frames):
        image = background.copy()
        _paint(image, {**spec, "x": x, "y": y}, angle, tint)
        images.append(image)
    _encode(out / "videos" / split / f"{key}.mp4", images, fps, codec)
    form = VIDEO_CAPTIONS[rng.integers(len(VIDEO_CAPTIONS))]
    text = form.format(x=_noun(color, shape), way=_WAYS[motion], motion=motion, bg=bg)
    return {"key": key, "video": f"videos/{split}/{key}.mp4", "text": text, "label": label, "motion": motion,
            "background": bg}


def _path(rng: np.random.Generator, size: int, side: int, motion: str, frames: int) -> list[tuple[float, float]]:
    """The shape's centre in each frame: evenly spaced from near one edge to near the opposite one, a little off
    the middle in the other direction, and never so close to an edge that the shape is cut."""
    low, high = side / 2 + 1, size - side / 2 - 1  # the centres `_place` allows
    travel = high - low
    start, end = low + rng.uniform(0, 0.1) * travel, high - rng.uniform(0, 0.1) * travel
    across = float(np.clip(size / 2 + rng.uniform(-0.1, 0.1) * size, low, high))
    along = np.linspace(start, end, frames)
    if motion in ("left", "up"):
        along = along[::-1]
    if motion in ("left", "right"):
        return [(float(a), across) for a in along]
    return [(across, float(a)) for a in along]


def _codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _encode(path: Path, images: list[Image.Image], fps: int, codec: str) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps, options=_ENCODER_OPTIONS[codec])
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())  # flush the frames the encoder holds back
