"""Encoders: from one modality's tensors to hidden states and a pooled vector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.models.config import AudioConfig, TextConfig, VideoConfig, VisionConfig, stem_channels
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


class PatchEmbed(nn.Conv2d):
    """ViT's patch projection: a convolution whose stride is its kernel, computed as one matrix product over the
    unfolded patches (oneDNN's bf16 convolution takes twice as long for it: 9.2 ms against 4.1 for a batch of 32
    ViT-B/32 images on a 2-core AMX Xeon). Same weights and output as the convolution ([N, width, rows, cols],
    laid out channels-last so that flattening it to tokens copies nothing)."""

    def __init__(self, in_channels: int, width: int, patch_size: int, bias: bool = True):
        super().__init__(in_channels, width, patch_size, patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        (ph, pw), out = self.kernel_size, self.out_channels
        rows, cols = height // ph, width // pw
        patches = x[..., : rows * ph, : cols * pw].reshape(n, c, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5)
        tokens = F.linear(patches.reshape(n, rows * cols, c * ph * pw), self.weight.reshape(out, -1), self.bias)
        return tokens.transpose(1, 2).view(n, out, rows, cols)


class ConvStem(nn.Sequential):
    """Pixels (or a spectrogram) to the patch grid through 3x3 stride-2 convolutions, then a 1x1 projection."""

    def __init__(self, in_channels: int, width: int, patch_size: int, bias: bool):
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch size, not {patch_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for out in stem_channels(width, patch_size):
            layers += [nn.Conv2d(channels, out, 3, 2, 1), nn.GELU()]
            channels = out
        super().__init__(*layers, nn.Conv2d(channels, width, 1, bias=bias))

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
            if cfg.image_size % cfg.patch_size:  # its convolutions round up where the patch grid rounds down
                raise ValueError(f"the conv stem needs an image size divisible by the patch size ({cfg.patch_size})")
            self.patch_embed = ConvStem(3, width, cfg.patch_size, cfg.patch_bias)
        elif cfg.stem == "patch":
            self.patch_embed = PatchEmbed(3, width, cfg.patch_size, bias=cfg.patch_bias)
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
        return self.transformer(self._embed(pixels), depth=n)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        return self.norm_pre(x + self.pos_embed)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            x = self._embed(pixels)
            return self.norm(self.transformer(x, rows=torch.zeros(len(x), dtype=torch.long, device=x.device)))[:, 0]
        return self.pooled(self.tokens(pixels))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled vector [N, width] of `tokens`' hidden states [N, T, width], as `forward` pools them."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return tokens[:, int(self.cfg.class_token):].mean(dim=1)
        return self.pool(tokens)


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
        pooled = self.pooled_positions(ids)
        if self.cfg.causal and ids.shape[0]:
            # Under a causal mask no state sees the padding after it: run up to the batch's longest text only
            # (CLIP pads to 77 tokens; a caption is often 10 to 20).
            ids = ids[:, : int(pooled.max()) + 1]
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        return self.norm(self.transformer(x, causal=self.cfg.causal, rows=pooled))[:, 0]

    def pooled_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The position [N] of the token each text is pooled from."""
        if self.cfg.pool == "last":
            return torch.full((len(ids),), ids.shape[1] - 1, device=ids.device)
        if self.cfg.pool == "first":
            return torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        if self.cfg.eos_token_id is None:
            return ids.argmax(dim=-1)
        return (ids == self.cfg.eos_token_id).int().argmax(dim=-1)


class AudioTransformer(nn.Module):
    """A ViT over log-mel patches (AST, ImageBind's audio tower): [N, n_mels, frames] to a pooled vector [N, width].

    The class token is what it pools; the spectrogram is one channel of a patch grid, mel bins by frames.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(1, cfg.width, cfg.patch_size, bias=True)
        elif cfg.stem == "patch":
            self.patch_embed = PatchEmbed(1, cfg.width, cfg.patch_size)
        else:
            raise ValueError(f"unknown audio stem {cfg.stem!r}")
        rows, columns = cfg.grid
        self.cls_token = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1 + rows * columns, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(mel[:, None].to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.transformer(x, rows=torch.zeros(len(x), dtype=torch.long, device=x.device)))[:, 0]


class TemporalPool(nn.Module):
    """Frame embeddings [N, T, D] to one vector per video [N, D]: their mean, or a small transformer over them.

    The transformer starts as the mean: its output is the mean frame plus a residual read from a class token,
    and that residual's projection starts at zero, so a freshly added video tower embeds as the image tower does.
    With `cfg.patches`, each frame's patch tokens [N, T, P, patch_width] join the sequence, projected to `dim` and
    marked with their frame's position (their place in the frame they carry from the image tower).
    """

    def __init__(self, cfg: VideoConfig, dim: int, patch_width: int | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.layers:
            self.cls_token = nn.Parameter(torch.zeros(dim))
            self.pos_embed = nn.Parameter(torch.zeros(cfg.max_frames, dim))
            self.transformer = Transformer(dim, cfg.layers, cfg.heads, cfg.mlp_ratio * dim, "gelu", 1e-5)
            self.norm = nn.LayerNorm(dim)
            self.proj = nn.Linear(dim, dim, bias=False)
            if cfg.patches:
                if patch_width is None:
                    raise ValueError("a video tower reading patches needs the image tower's width")
                self.patch_proj = nn.Linear(patch_width, dim)

    def forward(self, frames: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        mean = frames.mean(dim=1)
        if not self.cfg.layers:
            return mean
        when = self.pos_embed[: frames.shape[1]]
        parts = [self.cls_token.expand(frames.shape[0], 1, -1), frames + when]
        if self.cfg.patches:
            if patches is None:
                raise ValueError("this video tower reads the frames' patch tokens: pass them")
            parts.append((self.patch_proj(patches) + when[:, None]).flatten(1, 2))
        return mean + self.proj(self.norm(self.transformer(torch.cat(parts, 1)))[:, 0])


def resize_position_embedding(pos_embed: torch.Tensor, class_token: bool, grid: int) -> torch.Tensor:
    """A ViT's learned position embedding [tokens, width] for a `grid` x `grid` patch grid: the patches' table
    resized bicubically as a 2-D map (the class token's row kept), so a tower runs at another resolution than it
    was trained at, as open_clip and timm resize it."""
    head, table = (pos_embed[:1], pos_embed[1:]) if class_token else (pos_embed[:0], pos_embed)
    old = math.isqrt(table.shape[0])
    if old == grid:
        return pos_embed
    square = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False, antialias=old > grid)
    return torch.cat([head, resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos_embed.dtype)])
