"""Audio and video embedding throughput: Rosetta vs its peers on the same random-weights models, one process.

    python benchmarks/audio.py [--only clap|video] [--batch-size 16] [--repeats 5] [--threads N]

clap: transformers' ClapModel.get_audio_features against Rosetta's ClapModel.encode_audio (normalised) on a
clap-htsat-unfused-sized model (HTSAT-base, 256 x 256 spectrogram image, random weights), a batch of 10-second
clips' features (the extractor's cost is the same for both and is left out). Each runs its fastest path on
this CPU: transformers in fp32 (and bf16 where the CPU multiplies bf16 natively), Rosetta in fp32, bf16 where
native, and int8 (`dtype="int8"`, rosetta.nn.quantize). It prints clips/s, the ratio to transformers' fastest
path, and the cosine between each path's embeddings and transformers' fp32 ones, with the CPU.

video: seconds of video embedded per second at 1 frame/s, decoding included, on two 60-second 640 x 360
H.264 clips written here (30 fps, a keyframe every 2 s, B-frames, moving content), with one ViT-B/32 (random
weights) in both. Rosetta's `embed_videos` on its fastest path (`dtype="auto"`: int8 on a CPU without native
bf16) against the usual open_clip loop: PyAV decodes every frame, the frame on screen at each second's middle
goes to PIL, open_clip's preprocessing and encode_image (fp32), the mean of the normalised frames. It also
times the frames alone (Rosetta's `timed_frames` against the peer's decoding of every frame), since the image
tower dominates on a slow CPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo, place


def throughputs(contenders: dict[str, Callable[[], torch.Tensor]], items: int, repeats: int) -> dict[str, float]:
    """Items/s of each `name: fn`, timed in interleaved rounds (one call of each per round) and taken at the
    median round, so drift in the machine's speed (turbo, other load) hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up: kernel selection, allocator
        for _ in range(repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    return {name: items / statistics.median(times) for name, times in seconds.items()}


def report(unit: str, results: dict[str, float], embeddings: dict[str, torch.Tensor], peer: str) -> None:
    """Throughputs, the ratio to the peer's fastest path, and each path's cosine to the peer's fp32 output."""
    best = max(value for name, value in results.items() if name.startswith(peer))
    reference = embeddings[f"{peer} fp32"]
    for name, value in results.items():
        cosine = F.cosine_similarity(embeddings[name].float(), reference, dim=-1).min()
        print(f"{unit:8s} {name:26s} {value:7.2f}   x{value / best:.2f} vs the fastest {peer}   "
              f"cosine to {peer} fp32 >= {cosine:.5f}")


def clap(batch_size: int, repeats: int) -> None:
    """transformers' ClapModel.get_audio_features vs Rosetta's encode_audio, HTSAT-base, 10-s clips."""
    import transformers

    import rosetta

    torch.manual_seed(0)
    ours = rosetta.create("clap-htsat-unfused").eval()
    peers = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if cpu_has_fast_bf16() else {})}
    with tempfile.TemporaryDirectory() as directory:  # the same weights in both: Rosetta's, exported
        ours.save_pretrained(directory, format="transformers")
        peers = {name: transformers.ClapModel.from_pretrained(directory, dtype=dtype).eval()
                 for name, dtype in peers.items()}

    features = torch.randn(batch_size, 1, ours.config.features.frames, ours.config.features.n_mels) * 10 - 40
    is_longer = torch.zeros(batch_size, 1, dtype=torch.bool)

    def transformers_path(model):
        return lambda: model.get_audio_features(input_features=features.to(model.dtype), is_longer=is_longer)

    def rosetta_path(model):
        return lambda: F.normalize(model.encode_audio(features, is_longer).float(), dim=-1)

    contenders = {f"transformers {name}": transformers_path(model) for name, model in peers.items()}
    contenders["rosetta fp32"] = rosetta_path(ours)
    for dtype in ("bf16", "int8") if cpu_has_fast_bf16() else ("int8",):
        contenders[f"rosetta {dtype}"] = rosetta_path(place(copy.deepcopy(ours), "cpu", dtype))

    with torch.inference_mode():
        embeddings = {name: _features(fn()) for name, fn in contenders.items()}
    results = throughputs(contenders, batch_size, repeats)
    print(f"clap: HTSAT-base (clap-htsat-unfused sizes, random weights), batch {batch_size} of 10-s clips, "
          f"{repeats} interleaved rounds, median round")
    report("clips/s", results, embeddings, "transformers")
    print()


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_audio_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


VIDEO_CLIPS, VIDEO_SECONDS, VIDEO_FPS, VIDEO_SIZE = 2, 60, 30, (640, 360)


def write_test_video(path: Path, seed: int) -> Path:
    """A VIDEO_SECONDS-long H.264 clip as cameras and encoders make them: a textured scene panning and a
    square crossing it (so every frame differs and B-frames pay), a keyframe every 2 s."""
    import av
    from PIL import Image

    width, height = VIDEO_SIZE
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 20, width // 20, 3), dtype=np.uint8)
    scene = np.asarray(Image.fromarray(coarse).resize((2 * width, 2 * height), Image.BICUBIC))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        gop = 2 * VIDEO_FPS
        stream.options = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3"}
        for i in range(VIDEO_SECONDS * VIDEO_FPS):
            t = i / VIDEO_FPS
            x, y = int(width / 2 * (1 + np.sin(t / 7 + seed))), int(height / 2 * (1 + np.cos(t / 5 + seed)))
            frame = scene[y : y + height, x : x + width].copy()
            left, top = int((width - 80) * t / VIDEO_SECONDS), int((height - 80) * abs(np.sin(t + seed)))
            frame[top : top + 80, left : left + 80] = (255, 200, 50)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pyav_frames(path: Path) -> list:
    """The peer's decoding: every frame decoded; at each second's middle the frame on screen (the last one
    shown at or before it, as Rosetta takes) to PIL."""
    import av

    times = iter(t + 0.5 for t in range(VIDEO_SECONDS))
    target, previous, images = next(times), None, []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            while target is not None and previous is not None and frame.time > target + 1e-6:
                images.append(previous.to_image())
                target = next(times, None)
            previous = frame
    if target is not None:
        images.append(previous.to_image())
    return images


def open_clip_video(path: Path, model, transform) -> torch.Tensor:
    """The peer's loop: `pyav_frames`, preprocessed, embedded in one batch; the normalised mean."""
    features = model.encode_image(torch.stack([transform(image) for image in pyav_frames(path)]), normalize=True)
    return F.normalize(features.mean(dim=0), dim=-1)


def video(batch_size: int, repeats: int) -> None:
    """Rosetta's embed_videos (int8 ViT-B/32) vs PyAV + open_clip (fp32), seconds of video per second."""
    import open_clip

    import rosetta
    from rosetta.convert.mapping import to_theirs
    from rosetta.convert.open_clip import rules
    from rosetta.modalities.video import timed_frames
    from rosetta.models.config import VideoConfig

    torch.manual_seed(0)
    # The plain CLIP video path (the mean of the frames), at 1 frame/s over the whole clip.
    config = dataclasses.replace(rosetta.presets()["vit-b-32"],
                                 video=VideoConfig(fps=1.0, max_frames=VIDEO_SECONDS, layers=0))
    ours = rosetta.create(config).eval()
    peer = open_clip.create_model("ViT-B-32-quickgelu").eval()
    peer.load_state_dict(to_theirs(rules(ours.config, set(peer.state_dict())), ours.state_dict()))
    transform = open_clip.image_transform(ours.config.vision.image_size, is_train=False)
    fast = place(copy.deepcopy(ours), "cpu", "auto")
    fast_dtype = "int8" if getattr(fast, "quantized", False) else str(fast.dtype).removeprefix("torch.")

    with tempfile.TemporaryDirectory() as directory:
        paths = [write_test_video(Path(directory) / f"clip-{i}.mp4", seed=i) for i in range(VIDEO_CLIPS)]

        seconds = VIDEO_SECONDS * len(paths)
        embeddings = {
            "open_clip fp32": torch.stack([open_clip_video(path, peer, transform) for path in paths]),
            f"rosetta {fast_dtype}": fast.embed_videos(paths),
            "rosetta fp32": ours.embed_videos(paths),
        }
        results = throughputs({
            "open_clip fp32": lambda: [open_clip_video(path, peer, transform) for path in paths],
            f"rosetta {fast_dtype}": lambda: fast.embed_videos(paths),
            "rosetta fp32": lambda: ours.embed_videos(paths),
        }, seconds, repeats)
        sampling = throughputs({
            "PyAV, every frame": lambda: [pyav_frames(path) for path in paths],
            "rosetta timed_frames": lambda: [list(timed_frames(path, 1.0, None)) for path in paths],
        }, seconds, repeats)
    print(f"video: ViT-B/32 (random weights), {len(paths)} clips of {VIDEO_SECONDS} s, {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} "
          f"H.264 at {VIDEO_FPS} fps, keyframe every 2 s, B-frames; 1 frame/s; {repeats} interleaved rounds, median")
    report("video s/s", results, embeddings, "open_clip")
    base = sampling["PyAV, every frame"]
    for name, value in sampling.items():
        print(f"{'video s/s':8s} {name:26s} {value:7.1f}   x{value / base:.2f} vs PyAV (the frames at 1/s alone)")
    print()


SECTIONS: dict[str, Callable[[int, int], None]] = {"clap": clap, "video": video}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable; default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpuinfo('model name')} ({cpu_isa()}), threads: {torch.get_num_threads()}, "
          f"native bf16: {cpu_has_fast_bf16()}\n")
    for name in args.only or SECTIONS:
        SECTIONS[name](args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
