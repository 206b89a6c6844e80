"""The contrastive image-text model (CLIP, SigLIP): two towers projected into one embedding space."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rosetta.errors import InputError
from rosetta.modalities.image import ImageInput, load_image, preprocess
from rosetta.modalities.text import TextTokenizer, byte_tokenizer, clip_bpe, load_tokenizer_files
from rosetta.models.config import PRESETS, PRETRAINED, ContrastiveConfig
from rosetta.models.encoders import ConvStem, TextTransformer, VisionTransformer
from rosetta.models.registry import Family
from rosetta.templates import resolve_templates

T = TypeVar("T")


def _batches(items: Sequence[T], size: int, progress: bool | None, desc: str) -> Iterator[Sequence[T]]:
    starts = range(0, len(items), size)
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show or None, leave=False):
        yield items[start : start + size]


class ContrastiveModel(nn.Module):
    def __init__(self, config: ContrastiveConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.text = TextTransformer(config.text)
        if config.vision_proj:
            self.vision_proj = nn.Linear(config.vision.width, config.embed_dim, bias=False)
        elif config.vision.width != config.embed_dim:
            raise ValueError("without a vision projection, embed_dim must equal the vision width")
        else:
            self.vision_proj = nn.Identity()
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=config.text.proj_bias)
        # Shape [1], not a scalar: FSDP shards parameters along their first dimension.
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        bias = config.logit_bias_init
        self.logit_bias = nn.Parameter(torch.full((1,), float(bias))) if bias is not None else None
        self.tokenizer = tokenizer or TextTokenizer(
            byte_tokenizer(), config.text.context_length, config.text.pad_token_id, config.text.cleaning
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as CLIP does: small normal weights, projections scaled by the width."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for tower in (self.vision, self.text):
            nn.init.normal_(tower.pos_embed, std=0.01)
        if self.vision.cls_token is not None:
            nn.init.normal_(self.vision.cls_token, std=self.config.vision.width**-0.5)
        if isinstance(self.vision_proj, nn.Linear):
            nn.init.normal_(self.vision_proj.weight, std=self.config.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.config.text.width**-0.5)
        if isinstance(self.vision.patch_embed, ConvStem):
            self.vision.patch_embed.reset_parameters()

    # On CPUs without native bf16, dtype="auto" embeds in int8: twice open_clip's fp32 speed, within cosine 0.99
    # of fp32, the same zero-shot class (benchmarks/embed.py, benchmarks/int8.py).
    int8_when_auto = True

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embed.weight.dtype  # an embedding: it keeps its dtype when the linears are int8

    # Tensors in, features out: what training and export use.

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, H, W] to unnormalised image features [N, D]."""
        return self.vision_proj(self.vision(pixels))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] to unnormalised text features [N, D]."""
        return self.text_proj(self.text(ids))

    def forward(
        self, pixels: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the contrastive losses take: L2-normalised image and text features, log temperature, bias.

        The scalars come out of forward so that DDP and FSDP see every trained parameter used in it.
        """
        image = F.normalize(self.encode_image(pixels), dim=-1)
        return image, F.normalize(self.encode_text(ids), dim=-1), self.logit_scale, self.logit_bias

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Image-by-text logits [N, M] from normalised features, with the learned temperature (and bias)."""
        logits = self.logit_scale.exp().float() * image_features.float() @ text_features.float().T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.float()
        return logits

    # Inputs users hold in, embeddings out.

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and preprocess images into a float32 batch [N, 3, H, W]."""
        size = self.config.vision.image_size
        return torch.stack([preprocess(load_image(image), size, self.config.image) for image in images])

    def tokenize(self, texts: str | Sequence[str], truncate: bool = True) -> torch.Tensor:
        return self.tokenizer(texts, truncate=truncate)

    @torch.inference_mode()
    def embed_images(
        self, images: torch.Tensor | ImageInput | Sequence[ImageInput], batch_size: int = 32,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of images given as paths, bytes, PIL images, arrays, or a pixel tensor."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise InputError(f"pixel tensor: expected float [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
            batches = _batches(images, batch_size, progress, "images")
        else:
            if not isinstance(images, (list, tuple)):
                images = [images]
            batches = (self.preprocess(batch) for batch in _batches(images, batch_size, progress, "images"))
        out = [self.encode_image(batch.to(self.device, self.dtype)) for batch in batches]
        return F.normalize(torch.cat(out).float(), dim=-1) if out else self._empty()

    @torch.inference_mode()
    def embed_texts(
        self, texts: str | Sequence[str], batch_size: int = 256, progress: bool | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of strings."""
        if isinstance(texts, str):
            texts = [texts]
        out = [
            self.encode_text(self.tokenize(batch, truncate=truncate).to(self.device))
            for batch in _batches(list(texts), batch_size, progress, "texts")
        ]
        return F.normalize(torch.cat(out).float(), dim=-1) if out else self._empty()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self.config.embed_dim, device=self.device)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [N, M] between two sets of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    @torch.inference_mode()
    def classifier(self, labels: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        """One embedding per label [L, D], averaged over prompt templates (prompt ensembling)."""
        labels = [label.strip() for label in labels]
        if not labels or any(not label for label in labels):
            raise InputError("labels: need at least one non-empty label")
        prompts = resolve_templates(templates)
        texts = [prompt.format(label) for label in labels for prompt in prompts]
        per_prompt = self.embed_texts(texts).view(len(labels), len(prompts), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    @torch.inference_mode()
    def classify(
        self, images: torch.Tensor | ImageInput | Sequence[ImageInput], labels: Sequence[str],
        templates: str | Sequence[str] | None = None, batch_size: int = 32, progress: bool | None = None,
    ) -> torch.Tensor:
        """Zero-shot probabilities [N, L]: softmax over labels for CLIP, per-label sigmoid for SigLIP."""
        classifier = self.classifier(labels, templates)
        return self.probabilities(self.embed_images(images, batch_size=batch_size, progress=progress), classifier)

    @torch.inference_mode()
    def probabilities(self, image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """Label probabilities from image embeddings and a `classifier()`, as the model's loss defines them."""
        logits = self.logits(image_embeddings, classifier)
        return torch.sigmoid(logits) if self.config.loss == "sigmoid" else logits.softmax(dim=-1)

    def save_pretrained(self, directory: str | Path, format: str = "rosetta") -> Path:
        """Write a model directory: Rosetta's own format, or `format="transformers"` for transformers' CLIPModel."""
        from rosetta.models.registry import save

        return save(self, Path(directory), format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_params() / 1e6:.1f}M, temperature={1 / math.exp(self.logit_scale.item()):.4f}"


def read_tokenizer(directory: Path, config: ContrastiveConfig) -> TextTokenizer:
    backend = load_tokenizer_files(directory)
    if backend is None:
        # open_clip's default tokenizer is OpenAI CLIP's BPE, which its exports often do not ship.
        from rosetta.hub import resolve

        clip = resolve("openai/clip-vit-base-patch32")
        backend = load_tokenizer_files(clip) or clip_bpe(clip / "vocab.json", clip / "merges.txt")
    return TextTokenizer(backend, config.text.context_length, config.text.pad_token_id, config.text.cleaning)


FAMILY = Family(
    name="contrastive", config_class=ContrastiveConfig, model_class=ContrastiveModel, presets=PRESETS,
    pretrained=PRETRAINED, converters=("open_clip", "clip"), read_tokenizer=read_tokenizer,
)
