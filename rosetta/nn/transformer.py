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
        plain = all(type(fc) is Linear and not _hooked(fc) for fc in (self.fc1, self.fc2))
        if isinstance(self.act, QuickGELU) and plain and x.numel():
            return self._quick_gelu(x)
        return self.fc2(self.act(self.fc1(x)))

    def _quick_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(h·σ(1.702h)) with h = fc1(x), computed as fc2(silu(1.702h)) / 1.702 with the scalings on the narrow
        tensors (fc1's input, fc2's output), so the wide activation is one pass over memory instead of three (on a
        2-core AMX Xeon, bf16 ViT-B/32: the MLP's elementwise work was 16% of the image tower). addmm's alpha
        would scale for free, but leaves oneDNN's bf16 path for one that copies the whole output."""
        h = F.linear(x * 1.702, self.fc1.weight, None if self.fc1.bias is None else self.fc1.bias * 1.702)
        h = F.silu(h, inplace=not h.requires_grad)
        bias = None if self.fc2.bias is None else self.fc2.bias * 1.702
        return F.linear(h, self.fc2.weight, bias).mul_(1 / 1.702)


def _hooked(module: nn.Module) -> bool:
    """Whether something watches or rewrites the layer's calls (pruning, weight norm, feature capture)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention`, except when training small attention maps on a CPU: there its fused kernel's
    backward is 3-5x slower than plain matrix products (bf16, ViT-B/32's 50 and 77 tokens, 2-core AMX Xeon:
    15-18 ms against 3-6 for forward and backward), so those run as products with the softmax in fp32."""
    length = q.shape[-2]
    scores = q.shape[:-1].numel() * k.shape[-2]
    if q.device.type != "cpu" or not (q.requires_grad and torch.is_grad_enabled()) or scores > MATH_ATTENTION_MAX:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        future = torch.ones(length, k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v


# Attention scores per layer (batch x heads x queries x keys) up to which the products run: each layer keeps
# its maps for the backward (6 bytes a score), ~100 MB at this size (ViT-B/32 at batch 16: under 1M).
MATH_ATTENTION_MAX = 1 << 24


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

    def forward(self, x: torch.Tensor, causal: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over x [B, L, dim]; with `rows` [B], only the output at position rows[b] of each sequence,
        [B, 1, dim] (every position still gives its key and value)."""
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if rows is None:
            return self.out(_merge_heads(attention(q, k, v, causal=causal)))
        q = q[torch.arange(len(rows), device=rows.device), :, rows].unsqueeze(2)
        mask = None
        if causal:  # the query at position p sees keys 0..p
            mask = (torch.arange(k.shape[2], device=rows.device) <= rows[:, None])[:, None, None]
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


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

    def forward(self, x: torch.Tensor, causal: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The block over x [B, L, dim]; with `rows` [B], only its output at position rows[b], [B, 1, dim]: what a
        tower's last block needs when it pools one token (the class token, the end of text)."""
        residual = x if rows is None else x[torch.arange(len(rows), device=rows.device), rows].unsqueeze(1)
        x = residual + self.attn(self.norm1(x), causal=causal, rows=rows)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, act, norm_eps) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, causal: bool = False, depth: int | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The blocks over `x` (the first `depth` of them: an inner layer's states). With `rows` [B], the states
        [B, 1, dim] of one position per sequence: the last block computes nothing else (1/12 of ViT-B's work
        saved when it pools the class token)."""
        blocks = self.blocks[:depth]
        if rows is not None and not len(blocks):
            return x[torch.arange(len(rows), device=rows.device), rows].unsqueeze(1)
        for i, block in enumerate(blocks):
            last_rows = rows if i == len(blocks) - 1 else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, causal, last_rows, use_reentrant=False)
            else:
                x = block(x, causal=causal, rows=last_rows)
        return x
