"""Model FLOPs per sample, from the architecture, and the device's peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from rosetta.models.config import ContrastiveConfig, VideoConfig, stem_channels

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of common accelerators, by a substring of the device name.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "A10": 125.0, "L4": 121.0,
                    "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


def _transformer_flops(tokens: int, width: int, layers: int, mlp_dim: int) -> float:
    """Forward FLOPs of `layers` blocks over `tokens` tokens: the matrix products (2 FLOPs per multiply-add)."""
    projections = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def _stem_flops(stem: str, in_channels: int, height: int, width: int, patch: int, dim: int) -> float:
    """A patch projection, or 3x3 stride-2 convolutions then a 1x1 projection, over a height x width input."""
    if stem == "patch":
        return 2 * (height // patch) * (width // patch) * (in_channels * patch**2) * dim
    flops, channels = 0.0, in_channels
    for out in stem_channels(dim, patch):
        height, width = (height + 1) // 2, (width + 1) // 2
        flops += 2 * height * width * 9 * channels * out
        channels = out
    return flops + 2 * height * width * channels * dim


def tower_flops(config: ContrastiveConfig) -> tuple[float, float]:
    """Forward FLOPs of one image through the vision tower and one text through the text tower, projections included."""
    v, t = config.vision, config.text
    tokens = v.num_patches + int(v.class_token)
    stem = _stem_flops(v.stem, 3, v.image_size, v.image_size, v.patch_size, v.width)
    vision = stem + _transformer_flops(tokens, v.width, v.layers, v.mlp_dim)
    if v.pool == "map":
        vision += 2 * (tokens * 2 * v.width * v.width + 2 * v.width * v.width + 2 * v.width * v.mlp_dim)
    vision += 2 * config.embed_dim * v.width * config.vision_proj
    text = _transformer_flops(t.context_length, t.width, t.layers, t.mlp_dim) + 2 * config.embed_dim * t.width
    return vision, text


def modality_flops(config: ContrastiveConfig, modality: str) -> tuple[float, float]:
    """Forward FLOPs of one input of `modality` into the shared space: (through its own tower, through the image
    tower first) — a video's frames go through the image tower, then its temporal transformer pools them."""
    vision, text = tower_flops(config)
    if modality in ("image", "text"):
        return (vision if modality == "image" else text), 0.0
    if modality == "audio":
        a = config.audio
        rows, columns = a.grid
        stem = _stem_flops(a.stem, 1, a.n_mels, a.frames, a.patch_size, a.width)
        tokens = 1 + rows * columns
        return stem + _transformer_flops(tokens, a.width, a.layers, a.mlp_dim) + 2 * a.width * config.embed_dim, 0.0
    video, dim = config.video or VideoConfig(layers=0), config.embed_dim
    patches = config.vision.num_patches if video.patches else 0  # each frame's, projected into the sequence
    tokens = 1 + video.max_frames * (1 + patches)
    temporal = (_transformer_flops(tokens, dim, video.layers, video.mlp_ratio * dim) + 2 * dim * dim
                + video.max_frames * patches * 2 * config.vision.width * dim)
    return temporal * bool(video.layers), video.max_frames * vision


def pairing_flops(config: ContrastiveConfig, pairings: list[tuple[str, str]], trained: set[str]) -> float:
    """FLOPs of one training step per sample (a sample of each pairing): forward + backward (twice the
    forward) through the towers trained, forward only through the frozen ones (and a video's frames, which
    reach its temporal tower through the frozen image tower)."""
    total = 0.0
    for pair in pairings:
        for modality in pair:
            own, through_image = modality_flops(config, modality)
            total += own * (3 if modality in trained else 1) + through_image
    return total


def train_flops(config: ContrastiveConfig, locked_image: bool = False, locked_text: bool = False) -> float:
    """FLOPs per image-text pair of one training step: forward + backward (twice the forward); a locked tower
    runs forward only."""
    vision, text = tower_flops(config)
    return vision * (1 if locked_image else 3) + text * (1 if locked_text else 3)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of the device in this dtype: a table for GPUs; for a CPU, what a square matrix product in
    the dtype reaches on it, measured once per process (`describe_peak` says so). Counting SIMD lanes would
    miss AMX, which multiplies bf16 3-5x faster than fp32, and AVX2, where bf16 is emulated 6x slower."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((p for key, p in _GPU_PEAK_TFLOPS.items() if key in name), 100.0)
        return tflops * 1e12 * (1.0 if dtype in (torch.bfloat16, torch.float16) else 0.5)
    return measured_cpu_peak(dtype, torch.get_num_threads())[0]


def describe_peak(device: torch.device, dtype: torch.dtype) -> str:
    """Where `peak_flops` comes from, for the figures that quote it."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}'s datasheet peak"
    size = measured_cpu_peak(dtype, torch.get_num_threads())[1]
    return f"measured: a {size}x{size} {str(dtype).removeprefix('torch.')} matrix product on this CPU"


@functools.cache
def measured_cpu_peak(dtype: torch.dtype, threads: int) -> tuple[float, int]:
    """(FLOP/s, matrix size) of the best of a few square matrix products in `dtype` on `threads` threads; 1024
    at first, 2048 where that takes under 20 ms (fast hardware, where small products under-report)."""
    size = 1024
    while True:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        # F.linear, the product the models run: on an AVX2 CPU it reaches oneDNN's bf16 kernel, 10x faster
        # than torch.mm's there.
        F.linear(a, b)  # warm-up: the kernel's first call packs and allocates
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            F.linear(a, b)
            best = min(best, time.perf_counter() - start)
        if best >= 0.02 or size >= 2048:
            return 2 * size**3 / best, size
        size *= 2
