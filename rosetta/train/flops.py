"""Model FLOPs per sample, from the architecture, and the device's peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

from rosetta.models.config import ContrastiveConfig, VisionConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of common accelerators, by a substring of the device name.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "A10": 125.0, "L4": 121.0,
                    "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


def _transformer_flops(tokens: int, width: int, layers: int, mlp_dim: int) -> float:
    """Forward FLOPs of `layers` blocks over `tokens` tokens: the matrix products (2 FLOPs per multiply-add)."""
    projections = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def _stem_flops(v: VisionConfig) -> float:
    if v.stem == "patch":
        return 2 * v.num_patches * (3 * v.patch_size**2) * v.width
    flops, channels, side = 0.0, 3, v.image_size
    for out in v.stem_channels:  # 3x3 stride-2 convolutions, then the 1x1 projection
        side = (side + 1) // 2
        flops += 2 * side * side * 9 * channels * out
        channels = out
    return flops + 2 * side * side * channels * v.width


def tower_flops(config: ContrastiveConfig) -> tuple[float, float]:
    """Forward FLOPs of one image through the vision tower and one text through the text tower, projections included."""
    v, t = config.vision, config.text
    tokens = v.num_patches + int(v.class_token)
    vision = _stem_flops(v) + _transformer_flops(tokens, v.width, v.layers, v.mlp_dim)
    if v.pool == "map":
        vision += 2 * (tokens * 2 * v.width * v.width + 2 * v.width * v.width + 2 * v.width * v.mlp_dim)
    vision += 2 * config.embed_dim * v.width * config.vision_proj
    text = _transformer_flops(t.context_length, t.width, t.layers, t.mlp_dim) + 2 * config.embed_dim * t.width
    return vision, text


def train_flops(config: ContrastiveConfig, locked_image: bool = False, locked_text: bool = False) -> float:
    """FLOPs per image-text pair of one training step: forward + backward (twice the forward); a locked tower
    runs forward only."""
    vision, text = tower_flops(config)
    return vision * (1 if locked_image else 3) + text * (1 if locked_text else 3)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of the device for this dtype: a table for GPUs, SIMD width x FMA units x clock for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((p for key, p in _GPU_PEAK_TFLOPS.items() if key in name), 100.0)
        return tflops * 1e12 * (1.0 if dtype in (torch.bfloat16, torch.float16) else 0.5)
    capability = torch.backends.cpu.get_cpu_capability()
    lanes = 16 if "AVX512" in capability else 8  # fp32 lanes per vector
    flops_per_cycle = lanes * 2 * 2  # two FMA units, two FLOPs per FMA
    return torch.get_num_threads() * flops_per_cycle * _cpu_hz()


def _cpu_hz() -> float:
    from rosetta.models.io import cpuinfo

    mhz = cpuinfo("cpu MHz")
    return float(mhz) * 1e6 if mhz else 2.5e9
