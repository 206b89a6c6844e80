"""CLAP (LAION's contrastive language-audio pretraining): an HTSAT audio tower and a RoBERTa text tower projected
into one embedding space, for audio-text retrieval and zero-shot audio classification.

    48 kHz samples ─▶ log-mel [1 or 4, 1001, 64] (rosetta.modalities.clap_features)
        ─▶ BatchNorm per mel bin ─▶ time stretched to 1024 frames (bicubic) ─▶ folded into a 256 x 256 image:
           four 256-frame quarters stacked along the frequency axis
        ─▶ 4 x 4 patches ─▶ [fusion: + the three 10-s crops' patches, weighed by attentional feature fusion]
        ─▶ Swin stages: [LN ─▶ (shifted) window attention ─▶ + ─▶ LN ─▶ MLP ─▶ +] × depth ─▶ patch merging
        ─▶ LN ─▶ mean over patches ─▶ Linear ─▶ ReLU ─▶ Linear ─▶ audio embedding

    text ─▶ RoBERTa's BPE ─▶ token + position + type embeddings ─▶ LN
        ─▶ [self-attention ─▶ + ─▶ LN ─▶ MLP ─▶ + ─▶ LN] × layers ─▶ first token ─▶ Linear ─▶ tanh
        ─▶ Linear ─▶ ReLU ─▶ Linear ─▶ text embedding

Swin's windows are gathered, and scattered back, by one precomputed index per block (the cyclic shift, the
padding to whole windows and the window partition in one copy each way); window attention runs through
`scaled_dot_product_attention` with the relative position bias and the shift mask as one additive mask.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn

from rosetta.errors import InputError, RosettaError
from rosetta.modalities.audio import AudioInput, AudioSpans, describe, load_audio
from rosetta.modalities.clap_features import ClapFeatureConfig, ClapFeatureExtractor
from rosetta.modalities.text import TextTokenizer, load_tokenizer_files
from rosetta.models.contrastive import ContrastiveModel, _batches
from rosetta.models.registry import Family
from rosetta.nn.linear import Linear
from rosetta.nn.transformer import MLP

# LAION's zero-shot prompt (its ESC-50 evaluation).
AUDIO_TEMPLATES = ("This is a sound of {}.",)
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3 in RoBERTa's vocabulary


@dataclass(frozen=True)
class ClapAudioConfig:
    """HTSAT: a Swin transformer over the log-mel spectrogram folded into a square image."""

    n_mels: int = 64
    spec_size: int = 256  # the image's side
    patch_size: int = 4
    patch_stride: int = 4
    width: int = 96  # of the patch embeddings; doubled by each patch merging
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-5  # of the blocks' norms; the patch, merging and final norms keep PyTorch's 1e-5
    patch_norm: bool = True
    fusion: bool = False  # attentional feature fusion of long clips' crops (the "fused" checkpoints)
    fusion_ratio: int = 4  # channel reduction inside the fusion block

    @property
    def out_width(self) -> int:
        return self.width * 2 ** (len(self.depths) - 1)

    @property
    def freq_ratio(self) -> int:
        """How many time quarters are stacked along the frequency axis of the image."""
        return self.spec_size // self.n_mels


@dataclass(frozen=True)
class ClapTextConfig:
    """RoBERTa: a post-norm transformer encoder, pooled at its first token."""

    vocab_size: int = 50265
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    max_positions: int = 514
    norm_eps: float = 1e-12
    pad_token_id: int = 1

    @property
    def context_length(self) -> int:
        """Tokens a text can have: RoBERTa's positions start after the padding id."""
        return self.max_positions - self.pad_token_id - 1


@dataclass(frozen=True)
class ClapConfig:
    audio: ClapAudioConfig = field(default_factory=ClapAudioConfig)
    text: ClapTextConfig = field(default_factory=ClapTextConfig)
    features: ClapFeatureConfig = field(default_factory=ClapFeatureConfig)
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        if self.features.n_mels != self.audio.n_mels:
            raise ValueError(f"the features have {self.features.n_mels} mel bins, the audio tower "
                             f"{self.audio.n_mels}")
        if (self.features.truncation == "fusion") != self.audio.fusion:
            raise ValueError("fusion features (truncation='fusion') go with a fusion audio tower, and only there")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClapConfig:
        d = dict(d)
        audio = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("audio", {}).items()}
        return cls(audio=ClapAudioConfig(**audio), text=ClapTextConfig(**d.pop("text", {})),
                   features=ClapFeatureConfig(**d.pop("features", {})), **d)


PRESETS: dict[str, ClapConfig] = {
    "clap-htsat-unfused": ClapConfig(features=ClapFeatureConfig(truncation="rand_trunc")),
    "clap-htsat-fused": ClapConfig(audio=ClapAudioConfig(fusion=True)),
    # HTSAT's geometry (a 256 x 256 image, 8 x 8 windows, four stages) at tiny widths: builds and runs in
    # milliseconds; its byte-level tokenizer's ids fit the vocabulary.
    "tiny-clap": ClapConfig(
        audio=ClapAudioConfig(width=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), fusion=True),
        text=ClapTextConfig(vocab_size=260, width=32, layers=2, heads=4, mlp_dim=64, max_positions=80),
        embed_dim=32,
    ),
}

PRETRAINED: dict[str, str] = {
    "clap-htsat-unfused": "laion/clap-htsat-unfused",
    "clap-htsat-fused": "laion/clap-htsat-fused",
}


class Attention(nn.Module):
    """Multi-head self-attention with query, key and value in one projection, and an optional mask."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, dim]; `mask`, broadcast to [B, heads, L, L], is added to the attention logits (float) or says
        which keys each query may attend to (bool)."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


# The audio tower


class FeatureFusion(nn.Module):
    """Attentional feature fusion (Dai et al. 2021), as CLAP's fused HTSAT weighs a long clip's crops against
    the whole clip: a sigmoid gate from local (per position) and global (pooled) bottleneck convolutions."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        inner = channels // ratio

        def bottleneck(*first: nn.Module) -> nn.Sequential:
            return nn.Sequential(*first, nn.Conv2d(channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU(),
                                 nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))

        self.local_att = bottleneck()
        self.global_att = bottleneck(nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        both = x + residual
        gate = torch.sigmoid(self.local_att(both) + self.global_att(both))
        return 2 * x * gate + 2 * residual * (1 - gate)


def _window_partition(grid: torch.Tensor, window: int) -> torch.Tensor:
    """[H, W] (H, W multiples of `window`) to [windows, window * window], windows and positions row-major."""
    h, w = grid.shape
    return grid.view(h // window, window, w // window, window).transpose(1, 2).reshape(-1, window * window)


def _window_layout(height: int, width: int, window: int,
                   shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Where a block's windows take their tokens from, for a [height, width] grid shifted by `shift`:

    order [windows * N]      the grid token at each window position (height * width: a zero padding token)
    inverse [height * width] the window position of each grid token
    relative_index [N, N]    the row of the relative position bias table for each pair of positions in a window
    shift_mask [windows, N, N] or None: -100 between tokens that the cyclic shift brought together from
                             opposite edges of the grid (Swin's mask), where there is a shift
    """
    with torch.device("cpu"):  # computed, never loaded: real tensors even when the model is built on "meta"
        padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
        tokens = F.pad(torch.arange(height * width).view(height, width), (0, padded_w - width, 0, padded_h - height),
                       value=height * width)
        order = _window_partition(tokens.roll((-shift, -shift), dims=(0, 1)), window).flatten()
        inverse = torch.argsort(order)[: height * width]  # the padding token sorts last
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        delta = coords[:, :, None] - coords[:, None, :] + window - 1
        relative_index = delta[0] * (2 * window - 1) + delta[1]
        if not shift:
            return order, inverse, relative_index, None

        def regions(size: int) -> torch.Tensor:  # 0: never wrapped; 1: the last window's rest; 2: wrapped round
            index = torch.arange(size)
            return (index >= size - window).long() + (index >= size - shift).long()

        region = _window_partition(regions(padded_h)[:, None] * 3 + regions(padded_w)[None, :], window)
        return order, inverse, relative_index, (region[:, :, None] != region[:, None, :]).float() * -100.0


class SwinBlock(nn.Module):
    """Swin's block on a fixed [height, width] grid of tokens: (shifted) window attention, then an MLP."""

    def __init__(self, c: ClapAudioConfig, dim: int, heads: int, resolution: tuple[int, int], shifted: bool):
        super().__init__()
        height, width = resolution
        # A grid no larger than a window is one window, never shifted (as in Swin).
        window = min(c.window_size, height, width)
        shift = c.window_size // 2 if shifted and min(height, width) > c.window_size else 0
        self.norm1 = nn.LayerNorm(dim, eps=c.norm_eps)
        self.attn = Attention(dim, heads, c.qkv_bias)
        self.relative_position_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.norm2 = nn.LayerNorm(dim, eps=c.norm_eps)
        self.mlp = MLP(dim, int(dim * c.mlp_ratio), c.act)

        order, inverse, relative_index, shift_mask = _window_layout(height, width, window, shift)
        self.padded = len(order) > height * width
        self.windows, self.window_tokens = len(order) // window**2, window**2
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", inverse, persistent=False)
        self.register_buffer("relative_index", relative_index, persistent=False)
        self.register_buffer("shift_mask", shift_mask, persistent=False)

    def attention_mask(self) -> torch.Tensor:
        """The relative position bias, plus the shift mask: [1 or windows, heads, N, N]."""
        bias = self.relative_position_bias[self.relative_index].permute(2, 0, 1)[None]
        return bias if self.shift_mask is None else bias + self.shift_mask[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, height * width, dim]."""
        batch, _, dim = x.shape
        y = self.norm1(x)
        if self.padded:
            y = F.pad(y, (0, 0, 0, 1))
        windows = y.index_select(1, self.order).view(batch * self.windows, self.window_tokens, dim)
        mask = self.attention_mask()
        if mask.shape[0] > 1:  # one mask per window, the same in every clip
            mask = mask.repeat(batch, 1, 1, 1)
        y = self.attn(windows, mask).view(batch, -1, dim)
        x = x + y.index_select(1, self.inverse)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Each 2 x 2 neighbourhood of tokens concatenated (as Swin orders them), normalised and projected to 2 x dim."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        height, width = self.resolution
        x = x.view(batch, height, width, dim)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        h, w = x.shape[1] // 2, x.shape[2] // 2
        # [B, h, row, w, column, dim] -> [B, h, w, column, row, dim]: Swin's order (0,0), (1,0), (0,1), (1,1).
        x = x.view(batch, h, 2, w, 2, dim).permute(0, 1, 3, 4, 2, 5).reshape(batch, h * w, 4 * dim)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, c: ClapAudioConfig, index: int, resolution: tuple[int, int]):
        super().__init__()
        dim = c.width * 2**index
        self.blocks = nn.ModuleList(SwinBlock(c, dim, c.heads[index], resolution, shifted=i % 2 == 1)
                                    for i in range(c.depths[index]))
        last = index == len(c.depths) - 1
        self.merge = None if last else PatchMerging(dim, resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.merge is None else self.merge(x)


class HTSAT(nn.Module):
    """Log-mel features [B, 1 or 4, frames, n_mels] to a pooled audio vector [B, out_width]."""

    def __init__(self, c: ClapAudioConfig):
        super().__init__()
        if len(c.depths) != len(c.heads):
            raise ValueError("the audio tower needs one head count per stage")
        if c.spec_size % c.n_mels:
            raise ValueError(f"spec_size {c.spec_size} must be a multiple of n_mels {c.n_mels}")
        self.config = c
        self.mel_norm = nn.BatchNorm2d(c.n_mels)
        padding = (c.patch_size - c.patch_stride) // 2
        self.patch_embed = nn.Conv2d(1, c.width, c.patch_size, c.patch_stride, padding)
        self.patch_norm = nn.LayerNorm(c.width) if c.patch_norm else nn.Identity()
        if c.fusion:
            # A crop's patches are three times as wide in time: the three crops side by side fill the grid.
            self.crop_embed = nn.Conv2d(1, c.width, (c.patch_size, 3 * c.patch_size),
                                        (c.patch_stride, 3 * c.patch_stride), padding)
            self.fusion = FeatureFusion(c.width, c.fusion_ratio)
        grid = c.spec_size // c.patch_stride
        self.stages = nn.ModuleList(Stage(c, i, (-(-grid // 2**i),) * 2) for i in range(len(c.depths)))
        self.norm = nn.LayerNorm(c.out_width)

    def to_image(self, features: torch.Tensor) -> torch.Tensor:
        """[B, C, frames, n_mels] to [B, C, spec_size, spec_size]: normalised per mel bin, stretched to
        freq_ratio * spec_size frames, and its time quarters stacked along the frequency axis."""
        c = self.config
        batch, channels, frames, mels = features.shape
        frames_wanted = c.spec_size * c.freq_ratio
        if mels != c.n_mels or frames > frames_wanted:
            raise InputError(f"audio features: expected [N, C, at most {frames_wanted}, {c.n_mels}], "
                             f"got {list(features.shape)}")
        x = self.mel_norm(features.transpose(1, 3)).transpose(1, 3)
        if frames < frames_wanted:
            x = F.interpolate(x, (frames_wanted, mels), mode="bicubic", align_corners=True)
        quarters = x.reshape(batch, channels, c.freq_ratio, c.spec_size, mels)
        return quarters.transpose(3, 4).reshape(batch, channels, c.freq_ratio * mels, c.spec_size)

    def embed_patches(self, image: torch.Tensor, is_longer: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens [B, grid * grid, width] of channel 0 (the clip, or the whole clip squeezed), fused with
        the patches of the crops in channels 1-3 for the clips marked longer."""
        x = self.patch_embed(image[:, :1])
        if self.config.fusion and is_longer is not None and bool(is_longer.any()):
            rows = is_longer.reshape(-1).nonzero()[:, 0]
            crops = image[rows, 1:]
            b, n, height, width = crops.shape
            local = self.crop_embed(crops.reshape(b * n, 1, height, width))
            # [b, crop, dim, h, w] -> [b, dim, h, crop, w] -> the crops side by side, zero-padded to the grid
            local = local.view(b, n, *local.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)
            local = F.pad(local, (0, x.shape[-1] - local.shape[-1]))
            x = x.index_copy(0, rows, self.fusion(x[rows], local))
        return self.patch_norm(x.flatten(2).transpose(1, 2))

    def forward(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.patch_embed.weight.dtype
        x = self.embed_patches(self.to_image(features.to(dtype)), is_longer)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x).mean(dim=1)


# The text tower


class PostNormBlock(nn.Module):
    """BERT's block: the sublayers' outputs added to their inputs, then normalised."""

    def __init__(self, c: ClapTextConfig):
        super().__init__()
        self.attn = Attention(c.width, c.heads)
        self.norm1 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = MLP(c.width, c.mlp_dim, c.act)
        self.norm2 = nn.LayerNorm(c.width, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class RoBERTa(nn.Module):
    """Token ids [B, L] (and their mask) to the pooled first token [B, width]."""

    def __init__(self, c: ClapTextConfig):
        super().__init__()
        self.config = c
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Embedding(c.max_positions, c.width)
        self.type_embed = nn.Parameter(torch.zeros(c.width))  # CLAP's texts have one token type
        self.embed_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.blocks = nn.ModuleList(PostNormBlock(c) for _ in range(c.layers))
        self.pool = Linear(c.width, c.width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [B, L]: True at tokens, False at padding (default: wherever the id is not the padding id)."""
        pad = self.config.pad_token_id
        real = ids != pad
        # RoBERTa's positions count the real tokens from pad + 1; padding sits at position `pad`.
        positions = torch.cumsum(real, dim=1) * real + pad
        x = self.embed_norm(self.token_embed(ids) + self.type_embed + self.pos_embed(positions))
        keep = (real if mask is None else mask.bool())[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return torch.tanh(self.pool(x[:, 0]))


class Projection(nn.Module):
    """CLAP's projection head: Linear, ReLU, Linear."""

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.linear1 = Linear(dim, embed_dim)
        self.linear2 = Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


def byte_roberta_tokenizer() -> Tokenizer:
    """RoBERTa's special tokens (ids 0-3) and one token per byte: the tokenizer of CLAP models built untrained."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*ROBERTA_SPECIALS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(ROBERTA_SPECIALS))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


def clap_tokenizer(backend: Tokenizer, config: ClapTextConfig) -> TextTokenizer:
    return TextTokenizer(backend, config.context_length, config.pad_token_id, cleaning="none")


class ClapModel(nn.Module):
    def __init__(self, config: ClapConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.config = config
        self.audio = HTSAT(config.audio)
        self.audio_proj = Projection(config.audio.out_width, config.embed_dim)
        self.text = RoBERTa(config.text)
        self.text_proj = Projection(config.text.width, config.embed_dim)
        # CLAP learns one temperature per direction; audio-to-text logits (zero-shot) use the audio one.
        # Shape [1], not a scalar: FSDP shards parameters along their first dimension.
        self.logit_scale_audio = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        self.logit_scale_text = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        self.tokenizer = tokenizer or clap_tokenizer(byte_roberta_tokenizer(), config.text)
        self.features = ClapFeatureExtractor(config.features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal weights, zero biases, unit norms (BERT's and Swin's initialisation)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SwinBlock):
                nn.init.trunc_normal_(module.relative_position_bias, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.logit_scale_audio.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embed.weight.dtype  # an embedding: it keeps its dtype when the linears are int8

    # Tensors in, features out.

    def encode_audio(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel features [N, 1 or 4, frames, n_mels] (and, for fusion, which clips are longer [N]) to
        unnormalised audio features [N, D]."""
        return self.audio_proj(self.audio(features, is_longer))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [N, L] (and their attention mask) to unnormalised text features [N, D]."""
        return self.text_proj(self.text(ids, mask))

    def forward(self, features: torch.Tensor, is_longer: torch.Tensor | None, ids: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised audio and text features and the two log temperatures, for the contrastive loss."""
        audio = F.normalize(self.encode_audio(features, is_longer), dim=-1)
        text = F.normalize(self.encode_text(ids, mask), dim=-1)
        return audio, text, self.logit_scale_audio, self.logit_scale_text

    def logits(self, audio_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Audio-by-text logits [N, M] from normalised features (transformers' logits_per_audio)."""
        return self.logit_scale_audio.exp().float() * audio_features.float() @ text_features.float().T

    # Inputs users hold in, embeddings out.

    def preprocess(self, audio: Sequence[AudioInput], sample_rate: int | None = None,
                   seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and resample clips to the model's rate, and compute each one's features as a batch of its own
        (as transformers' processor does for one clip), its random crops drawn from `seed`: a clip's features
        depend on nothing but the clip (`seed=None`: unseeded crops). Arrays are samples at `sample_rate`
        (default: the model's, 48 kHz)."""
        rate = self.config.features.sampling_rate
        features, is_longer = zip(*(
            self.features([load_audio(clip, rate, source_rate=sample_rate)], np.random.RandomState(seed))
            for clip in audio
        ))
        return torch.cat(features), torch.cat(is_longer)

    def tokenize(self, texts: str | Sequence[str], truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [N, L] padded to the longest text, and their attention mask."""
        ids = self.tokenizer(texts, truncate=truncate)
        mask = ids != self.config.text.pad_token_id
        length = int(mask.sum(dim=1).max()) if len(ids) else 0
        return ids[:, :length], mask[:, :length]

    @torch.inference_mode()
    def embed_audio(self, audio: AudioInput | Sequence[AudioInput], batch_size: int = 16,
                    progress: bool | None = None, sample_rate: int | None = None, seed: int | None = 0) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of clips given as paths, bytes, or sample arrays ([samples] or
        [channels, samples] at `sample_rate`, default 48 kHz)."""
        if not isinstance(audio, (list, tuple)):
            audio = [audio]
        out = []
        for batch in _batches(audio, batch_size, progress, "clips"):
            features, is_longer = self.preprocess(batch, sample_rate, seed)
            out.append(self.encode_audio(features.to(self.device), is_longer.to(self.device)))
        return F.normalize(torch.cat(out).float(), dim=-1) if out else self._empty()

    @torch.inference_mode()
    def embed_audio_segments(self, audio: AudioInput, batch_size: int = 16, sample_rate: int | None = None,
                             seed: int | None = 0) -> list[tuple[float, float, torch.Tensor]]:
        """(start s, end s, embedding [D]) of each consecutive window of a clip, of the features' length (10 s):
        where in a recording a sound is. Each window's embedding is `embed_audio`'s of that window cut out. As
        for `ContrastiveModel.embed_audio_segments`, a last window shorter than a quarter of one is dropped
        unless it is the only one; a window ends where the clip does, if sooner. The clip is read window by
        window: a long recording is never held whole."""
        rate = self.config.features.sampling_rate
        samples = self.config.features.max_samples
        spans = AudioSpans(audio, rate, source_rate=sample_rate)
        rows: list[tuple[float, float, torch.Tensor]] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            vectors = self.embed_audio([clip for _, clip in pending], batch_size=batch_size, seed=seed)
            rows.extend(((start / rate, (start + len(clip)) / rate, vector)
                         for (start, clip), vector in zip(pending, vectors)))
            pending.clear()

        start = 0
        while True:
            # Copied: a view would keep the reader's whole buffer alive while the batch fills.
            clip = spans(start, start + samples).copy()
            if not len(clip) or (start and len(clip) < samples // 4):
                break
            pending.append((start, clip))
            if len(pending) == batch_size:
                flush()
            if len(clip) < samples:
                break
            start += samples
        if pending:
            flush()
        if not rows:
            raise InputError(f"{describe(audio)}: no audio (zero samples)")
        return rows

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 256, progress: bool | None = None,
                    truncate: bool = True) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of strings."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for batch in _batches(list(texts), batch_size, progress, "texts"):
            ids, mask = self.tokenize(batch, truncate=truncate)
            out.append(self.encode_text(ids.to(self.device), mask.to(self.device)))
        return F.normalize(torch.cat(out).float(), dim=-1) if out else self._empty()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self.config.embed_dim, device=self.device)

    similarity = staticmethod(ContrastiveModel.similarity)  # cosine similarity [N, M] of two sets of embeddings

    def classifier(self, labels: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        """One embedding per label [L, D], averaged over prompt templates (default: LAION's "This is a sound of
        {}.")."""
        return ContrastiveModel.classifier(self, labels, templates or AUDIO_TEMPLATES)

    @torch.inference_mode()
    def classify(self, audio: AudioInput | Sequence[AudioInput], labels: Sequence[str],
                 templates: str | Sequence[str] | None = None, batch_size: int = 16,
                 progress: bool | None = None) -> torch.Tensor:
        """Zero-shot probabilities [N, L]: the softmax over labels of the audio-to-text logits."""
        classifier = self.classifier(labels, templates)
        embeddings = self.embed_audio(audio, batch_size=batch_size, progress=progress)
        return self.logits(embeddings, classifier).softmax(dim=-1)

    def save_pretrained(self, directory: str | Path, format: str = "rosetta") -> Path:
        """Write a model directory: Rosetta's own format, or `format="transformers"` for transformers' ClapModel."""
        from rosetta.models.registry import save

        return save(self, Path(directory), format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_params() / 1e6:.1f}M, fusion={self.config.audio.fusion}"


def read_tokenizer(directory: Path, config: ClapConfig) -> TextTokenizer:
    """The checkpoint's tokenizer.json; or RoBERTa's byte-level BPE from its vocab.json and merges.txt."""
    directory = Path(directory)
    if (directory / "tokenizer.json").exists():
        backend = load_tokenizer_files(directory)
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        backend = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(ROBERTA_SPECIALS))
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")))
    else:
        raise RosettaError(f"{directory}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return clap_tokenizer(backend, config.text)


FAMILY = Family(
    name="clap", config_class=ClapConfig, model_class=ClapModel, presets=PRESETS, pretrained=PRETRAINED,
    converters=("clap",), read_tokenizer=read_tokenizer,
)
