"""Encoders: from one modality's tensors to hidden states and a pooled vector."""

from __future__ import annotations

import torch
from torch import nn

from rosetta.models.config import TextConfig, VisionConfig
from rosetta.nn.transformer import MLP, CrossAttention, Transformer


class AttentionPool(nn.Module):
    """SigLIP's pooling head: a learned probe attends over all tokens, then a residual MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = CrossAttention(dim, heads)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.attn(self.probe.expand(x.shape[0], -1, -1), x)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class ConvStem(nn.Sequential):
    """Pixels to the patch grid through 3x3 stride-2 convolutions, then a 1x1 projection to the width."""

    def __init__(self, cfg: VisionConfig):
        if cfg.patch_size < 2 or cfg.patch_size & (cfg.patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch size, not {cfg.patch_size}")
        if cfg.image_size % cfg.patch_size:  # its convolutions round up where the patch grid rounds down
            raise ValueError(f"the conv stem needs an image size divisible by the patch size ({cfg.patch_size})")
        layers: list[nn.Module] = []
        channels = 3
        for out in cfg.stem_channels:
            layers += [nn.Conv2d(channels, out, 3, 2, 1), nn.GELU()]
            channels = out
        super().__init__(*layers, nn.Conv2d(channels, cfg.width, 1, bias=cfg.patch_bias))

    def reset_parameters(self) -> None:
        """He initialisation: CLIP's small normal weights would fade the signal through the stacked convolutions."""
        for conv in self:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    @property
    def weight(self) -> torch.Tensor:  # the first layer's, for the input dtype
        return self[0].weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg)
        elif cfg.stem == "patch":
            self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        else:
            raise ValueError(f"unknown vision stem {cfg.stem!r}")
        self.cls_token = nn.Parameter(torch.zeros(width)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches + cfg.class_token, width))
        self.norm_pre = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        if cfg.pool == "map":
            self.pool = AttentionPool(width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        elif cfg.pool not in ("cls", "mean"):
            raise ValueError(f"unknown vision pooling {cfg.pool!r}")
        if cfg.pool == "cls" and not cfg.class_token:
            raise ValueError("class-token pooling needs class_token=True")

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states of every token, [N, T, width]."""
        return self.norm(self.transformer(self._embed(pixels)))

    def layer_states(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states [N, T, width] after `layer` blocks, unnormalised: transformers' `hidden_states[layer]`
        (0: the embedded patches; -1: the last block's output; -2, what LLaVA reads: the one before)."""
        blocks = self.transformer.blocks
        n = layer if layer >= 0 else len(blocks) + 1 + layer
        if not 0 <= n <= len(blocks):
            raise ValueError(f"feature layer {layer}: the tower has {len(blocks)} blocks")
        x = self._embed(pixels)
        for block in blocks[:n]:
            x = block(x)
        return x

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        return self.norm_pre(x + self.pos_embed)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.tokens(pixels)
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.pool == "mean":
            return x[:, int(self.cfg.class_token):].mean(dim=1)
        return self.pool(x)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.pool not in ("eos", "last", "first"):
            raise ValueError(f"unknown text pooling {cfg.pool!r}")
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        return self.norm(self.transformer(x, causal=self.cfg.causal))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        if self.cfg.pool == "last":
            return x[:, -1]
        if self.cfg.pool == "first":
            return x[:, 0]
        if self.cfg.eos_token_id is None:
            eos = ids.argmax(dim=-1)
        else:
            eos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eos]
