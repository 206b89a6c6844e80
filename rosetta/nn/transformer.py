"""The pre-norm transformer every Rosetta encoder is built from.

Attention keeps query, key and value in one fused projection (one matrix product instead of
three) and runs through `scaled_dot_product_attention`, which picks the fastest kernel for the
device and dtype (flash attention on CPU and CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rosetta.nn.linear import Linear


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x * 1.702).mul_(1 / 1.702)  # x * sigmoid(1.702 x) in two passes over memory, not four


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r} (expected gelu, gelu_tanh or quick_gelu)")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, dim = x.shape
    return x.view(batch, length, heads, dim // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(_merge_heads(y))


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another (attention pooling, an encoder's output)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.out = Linear(dim, dim)

    def forward(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.attend(queries, *self.keys_values(x))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, S, head_dim] of x [B, S, dim]: computed once, attended by every step."""
        k, v = self.kv(x).chunk(2, dim=-1)
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def attend(self, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(queries), self.heads)
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def scores(self, queries: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The attention logits [B, heads, L, S] (scaled, before the softmax), for alignment."""
        q = _split_heads(self.q(queries), self.heads)
        return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, act, norm_eps) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, depth: int | None = None) -> torch.Tensor:
        """The blocks over `x` (the first `depth` of them: an inner layer's states)."""
        for block in self.blocks[:depth]:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x
