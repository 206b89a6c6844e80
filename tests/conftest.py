"""Shared fixtures: CLIP's BPE files built offline from the copy open_clip ships, and seeded randomness."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def model():
    """The `tiny` preset with seeded random weights, as `--random-init` makes it in every command."""
    import rosetta

    torch.manual_seed(0)
    return rosetta.create("tiny").eval()

CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_bpe(directory: Path) -> Path:
    """Write vocab.json + merges.txt exactly as openai/clip-vit-* ship them, from open_clip's bundled BPE merges."""
    import open_clip.tokenizer

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += [BOS, EOS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return directory


@pytest.fixture(scope="session")
def clip_bpe_dir(tmp_path_factory) -> Path:
    """A directory holding only CLIP's vocab.json and merges.txt (49408 tokens)."""
    return write_clip_bpe(tmp_path_factory.mktemp("clip_bpe"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread runs them fastest, and does not slow to a crawl when other
    processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """A real uvicorn server for `app` in a thread, on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


# Sounds and videos made in the test: small, exact, decodable by soundfile and PyAV.

AUDIO_TOWER = {"width": 64, "layers": 2, "heads": 4, "mlp_dim": 128, "seconds": 1.5, "n_mels": 32, "patch_size": 8}
VIDEO_TOWER = {"fps": 2, "max_frames": 4, "layers": 1}  # windows of 2 s


def hearing_model():
    """The seeded `tiny` model with an (untrained) audio tower and video tower bound to it."""
    import rosetta
    from rosetta.train.trainer import with_towers

    torch.manual_seed(0)
    model = with_towers(rosetta.create("tiny"), {"audio": AUDIO_TOWER, "video": VIDEO_TOWER}).eval()
    model.name = "tiny-hearing"
    return model


def tones(*parts: tuple[float, float], rate: int = 16_000):
    """Samples of consecutive tones, (hz, seconds) each, as float32."""
    import numpy as np

    waves = [0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate) for hz, seconds in parts]
    return np.concatenate(waves).astype(np.float32)


def write_tones(path: Path, *parts: tuple[float, float]) -> Path:
    """A 16 kHz float WAV of consecutive tones: its samples read back exactly."""
    import soundfile as sf

    sf.write(path, tones(*parts), 16_000, subtype="FLOAT")
    return path


def write_video(path: Path, colours: list[tuple[int, int, int]], seconds_each: float = 2.0, rate: int = 4,
                tone: float | None = None) -> Path:
    """An MPEG-4 video of solid colours, `seconds_each` seconds each, with an optional tone as its sound."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"flags": "+qscale", "global_quality": str(2 * 118)}  # a fixed quantiser keeps the colours
        sound = container.add_stream("aac", rate=16_000) if tone is not None else None  # every stream before muxing
        for colour in colours:
            for _ in range(int(seconds_each * rate)):
                frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), colour, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            samples = tones((tone, seconds_each * len(colours)))[None]
            for start in range(0, samples.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
                chunk.sample_rate = 16_000
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path
