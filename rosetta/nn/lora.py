"""LoRA (Hu et al. 2021): a frozen linear layer plus a trained low-rank update, W x + (alpha / r) B A x.

B starts at zero, so an adapted model starts as the model it adapts; merging folds B A into W, after which the
model is a plain one again (what training saves). Our decoder fuses q, k and v into one `qkv` layer (and gate
and up into `gate_up`), so an adapter on `qkv` shares A between the three: one rank-r update of the fused
matrix rather than three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rosetta.errors import RosettaError

DEFAULT_TARGETS = ("qkv", "out")  # the attention projections, as LoRA's paper adapts


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises, and peft
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            self.base.weight += (self.scale * self.lora_b.float() @ self.lora_a.float()).to(self.base.weight.dtype)
        return self.base


def add_lora(module: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every linear layer of `module` whose own name is in `targets` in a LoRALinear; returns their paths."""
    if rank < 1:
        raise RosettaError(f"lora rank {rank}: must be at least 1")
    adapted = []
    for path, child in list(module.named_modules()):
        for name, layer in list(child.named_children()):
            if name in targets and isinstance(layer, nn.Linear):
                setattr(child, name, LoRALinear(layer, rank, alpha, dropout))
                adapted.append(f"{path}.{name}" if path else name)
    if not adapted:
        raise RosettaError(f"lora targets {', '.join(targets)}: no linear layer of the model has those names")
    return adapted


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter of `module` into its base layer, in place; returns `module`."""
    for child in list(module.modules()):
        for name, layer in list(child.named_children()):
            if isinstance(layer, LoRALinear):
                setattr(child, name, layer.merged())
    return module


def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict as if its adapters were merged (each adapted weight computed anew on the CPU, every
    other tensor shared): what a merged copy would hold, without copying the module."""
    state = {}
    adapted = {path: layer for path, layer in module.named_modules() if isinstance(layer, LoRALinear)}
    for key, value in module.state_dict().items():
        path, _, name = key.rpartition(".")
        owner = path.removesuffix(".base")
        if owner in adapted:
            if ".lora_" in key or not path.endswith(".base"):
                continue
            layer = adapted[owner]
            if name == "weight":
                update = layer.scale * layer.lora_b.detach().float().cpu() @ layer.lora_a.detach().float().cpu()
                value = (value.detach().float().cpu() + update).to(value.dtype)
            state[f"{owner}.{name}"] = value
        else:
            state[key] = value
    return state


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Both factors of every adapter, as trained: with the frozen base weights (rebuilt as the run built them),
    what resumes a LoRA run exactly, where the merged model would not."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}
