"""The built-in speech dataset: sentences spoken by espeak-ng in several voices, speeds and pitches, some
over background noise, with the text of each — for evaluating speech recognition without a download.

    OUT/audio/<split>/<key>.wav, OUT/train.jsonl, val.jsonl, test.jsonl  ({"audio", "text", "voice", ...})

Same arguments, same sentences and voices (espeak-ng itself is deterministic).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from rosetta.data.builtin import SPLITS, split_sizes
from rosetta.data.records import write_manifest
from rosetta.errors import RosettaError

VOICES = ("en-us", "en", "en-us+m3", "en+f2", "en-us+f3", "en+m2", "en+f4", "en-us+m1")
NAMES = ("Alice", "Bob", "Maria", "David", "Sarah", "James", "Emma", "Peter")
PLACES = ("the station", "the library", "the market", "the office", "the park", "the museum", "the harbour")
THINGS = ("coffee", "bread", "tickets", "flowers", "books", "apples", "paper", "batteries")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty")
TEMPLATES = (
    "{name} is meeting us at {place} on {day}.",
    "Please buy {number} bags of {thing} before {day}.",
    "The train to {place} leaves in {number} minutes.",
    "{name} forgot the {thing} at {place} again.",
    "We will be at {place} from {number} until late on {day}.",
    "Could you ask {name} to bring {number} {thing} tomorrow?",
    "On {day} the shop near {place} sells {thing} at half price.",
    "It takes about {number} minutes to walk to {place}.",
)


def sentence(rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    return template.format(name=pick(NAMES), place=pick(PLACES), thing=pick(THINGS), day=pick(DAYS),
                           number=pick(NUMBERS))


def make_speech(out: str | Path, n: int, seed: int = 0, noise: bool = True) -> dict[str, int]:
    """Write `n` spoken sentences to `out`, split 80/10/10; every third one over noise when `noise`."""
    if n < 1:
        raise RosettaError(f"--n {n}: need at least 1 sentence")
    espeak = find_espeak("the speech dataset")
    import soundfile as sf

    out = Path(out)
    sizes = split_sizes(n)
    for split in SPLITS:
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(sizes[split]):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])
            record = _speak(espeak, rng, noisy=noise and i % 3 == 2)
            samples, rate = record.pop("samples"), record.pop("rate")
            key = f"{split}-{i:06d}"
            sf.write(out / "audio" / split / f"{key}.wav", samples, rate, subtype="PCM_16")
            records.append({"key": key, "audio": f"audio/{split}/{key}.wav", **record})
        write_manifest(records, out / f"{split}.jsonl")
    return sizes


def find_espeak(what: str) -> str:
    """The espeak-ng executable, which speaks `what`; a RosettaError saying how to install it if there is none."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RosettaError(f"espeak-ng, which speaks {what}, is not installed "
                           "(apt-get install espeak-ng, or brew install espeak-ng)")
    return espeak


def speak(espeak: str, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """`text` spoken by espeak-ng in `voice` at `speed` words a minute and `pitch` (0-99): mono float32 and its rate."""
    import soundfile as sf

    # The WAV comes through a pipe, so its header gives no length; libsndfile reads to the end regardless.
    wav = subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text], check=True,
                         capture_output=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return samples, rate


def over_noise(rng: np.random.Generator, samples: np.ndarray, snr_db: float) -> np.ndarray:
    """`samples` over white noise `snr_db` decibels below their power, clipped to [-1, 1]."""
    power = float(np.mean(samples**2)) or 1e-8
    noise = rng.standard_normal(len(samples)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(samples + noise, -1, 1)


def _speak(espeak: str, rng: np.random.Generator, noisy: bool) -> dict[str, Any]:
    text = sentence(rng)
    voice = VOICES[rng.integers(len(VOICES))]
    speed, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 70))
    samples, rate = speak(espeak, text, voice, speed, pitch)
    snr = None
    if noisy:  # white noise at 10-20 dB below the speech
        snr = float(rng.uniform(10, 20))
        samples = over_noise(rng, samples, snr)
    return {"text": text, "voice": voice, "speed": speed, "pitch": pitch,
            "snr_db": None if snr is None else round(snr, 1), "samples": samples, "rate": rate}
