"""Contrastive objectives: CLIP's softmax loss and SigLIP's sigmoid loss.

Each rank computes the loss of its own rows against every rank's columns (open_clip's local-loss
mode): the mean of the ranks' losses equals the loss of one process holding the global batch, and
with gradients flowing through the gather, so do the gradients DDP averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rosetta.train.distributed import World, gather_with_grad

SINGLE = World()  # one process


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, world: World = SINGLE
) -> torch.Tensor:
    """Symmetric cross-entropy over image-text similarities; the i-th image matches the i-th text."""
    all_image, all_text = gather_with_grad(image, world), gather_with_grad(text, world)
    labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * world.rank
    scale = logit_scale.exp()
    per_image = scale * image @ all_text.T
    per_text = scale * text @ all_image.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def siglip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    world: World = SINGLE,
) -> torch.Tensor:
    """Binary log-loss on every image-text pair: +1 for a match, -1 otherwise; summed, per image."""
    all_text = gather_with_grad(text, world)
    logits = logit_scale.exp() * image @ all_text.T + logit_bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + image.shape[0] * world.rank] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def contrastive_loss(
    kind: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None, world: World = SINGLE,
) -> torch.Tensor:
    image, text = image.float(), text.float()
    if kind == "softmax":
        return clip_loss(image, text, logit_scale.float(), world)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a model with a logit bias (SigLIP)")
        return siglip_loss(image, text, logit_scale.float(), logit_bias.float(), world)
    raise ValueError(f"unknown loss {kind!r} (expected softmax or sigmoid)")
