"""The blocks of a Llama-style causal decoder: RMSNorm, rotary positions, grouped-query attention with a KV
cache, and the SwiGLU MLP.

Projections that read the same input are fused (q, k and v in one matrix; the MLP's gate and up in another):
at decode time a step is a chain of matrix-vector products, and fewer, larger ones read the weights faster and
cost fewer Python calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.nn.cache import CacheWindow
from rosetta.nn.linear import Linear


class RMSNorm(nn.Module):
    """Root-mean-square normalisation, computed in fp32 whatever the weights' dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.rms_norm: at decode time (one token) its kernel costs ~15x these four ops.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for contexts longer than the model was pretrained on.

    kind "default" (none), "linear" (every frequency divided by `factor`), or "llama3" (low frequencies
    divided by `factor`, high ones kept, a smooth ramp between, as Llama 3.1+ do).
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


ROPE_KINDS = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The inverse frequencies [head_dim / 2] of each rotated pair of channels."""
    # On the CPU even while a model is built on the meta device: the frequencies are computed, never loaded.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    scaling = scaling or RopeScaling()
    if scaling.kind == "default":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind != "llama3":
        raise ValueError(f"unknown rotary scaling {scaling.kind!r} (expected one of {', '.join(ROPE_KINDS)})")
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_context / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_context / scaling.high_freq_factor
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin [B, L, head_dim] of each token's position, computed once per forward for every layer.

    The frequencies are a plain tensor, not a buffer: `model.to(torch.bfloat16)` would round them to bf16,
    and a rotation angle of position x frequency then drifts by radians within a few thousand tokens.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.inv_freq = rope_frequencies(head_dim, theta, scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, L, head_dim] by its positions' angles (channels paired half against half)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    """Grouped-query self-attention: `kv_heads` key/value heads shared by `heads` query heads."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool = False,
                 out_bias: bool = False):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads evenly")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias)
        self.out = Linear(heads * head_dim, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, window: CacheWindow,
                layer: int) -> torch.Tensor:
        """Self-attention of x [B, L, dim] through the cache window; `rope` None: positions are elsewhere."""
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qk, v = self.qkv(x).split([(heads + kv_heads) * head_dim, kv_heads * head_dim], dim=-1)
        qk = qk.view(batch, length, heads + kv_heads, head_dim).transpose(1, 2)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([heads, kv_heads], dim=1)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        k, v = window.update(layer, k, v)
        if length == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            y = _attend_one(q, k, v, window.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=window.mask, is_causal=window.is_causal,
                                               enable_gqa=kv_heads != heads)
        return self.out(y.transpose(1, 2).reshape(batch, length, heads * head_dim))


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row [B, H, 1, D] over keys [B, Hkv, S, D] (a decode step), in fp32.

    For bf16 and fp16 on a CPU: scaled_dot_product_attention's kernel there is 3x slower than these fp32
    products at a few hundred keys (and the gap grows with the context). The query heads that share a
    key/value head are stacked as rows of one matrix product, so grouped keys are never repeated.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.float().view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = (q @ k.float().transpose(2, 3)) * head_dim**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    return (scores.softmax(dim=-1) @ v.float()).to(v.dtype).view(batch, heads, 1, head_dim)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), projected back down: Llama's MLP."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_up = Linear(dim, 2 * hidden, bias=bias)
        self.down = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, mlp_dim: int, norm_eps: float,
                 qkv_bias: bool = False, out_bias: bool = False, mlp_bias: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, heads, kv_heads, head_dim, qkv_bias, out_bias)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_dim, mlp_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], window: CacheWindow,
                layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, window, layer)
        return x + self.mlp(self.mlp_norm(x))
