"""Declarative weight-name mappings between a foreign checkpoint and Rosetta's modules.

A `Rule` joins a group of our tensors to a group of theirs. Within a group both sides are
concatenated along dim 0, which covers fused projections (their q, k, v into our qkv; their
in_proj into our q and kv). The same rules convert in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rosetta.errors import RosettaError


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transpose: bool = False  # theirs stores the matrix as [in, out] (open_clip's projections)


def rule(ours: str | tuple[str, ...], theirs: str | tuple[str, ...], transpose: bool = False) -> Rule:
    as_tuple = lambda names: (names,) if isinstance(names, str) else tuple(names)  # noqa: E731
    return Rule(as_tuple(ours), as_tuple(theirs), transpose)


def linear(ours: str, theirs: str | tuple[str, ...], bias: bool = True) -> list[Rule]:
    """Weight (and bias) of a linear or norm layer, possibly fused from several of theirs."""
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    rules = [rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs))]
    if bias:
        rules.append(rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs)))
    return rules


def to_ours(rules: list[Rule], theirs: dict[str, torch.Tensor], shapes: dict[str, torch.Size],
            source: str) -> dict[str, torch.Tensor]:
    """Convert their state dict to ours; `shapes` are our parameters' shapes."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        missing = [name for name in r.theirs if name not in theirs]
        if missing:
            raise RosettaError(f"{source}: checkpoint lacks {missing[0]} (not a checkpoint of this architecture?)")
        parts = [theirs[name].T if r.transpose else theirs[name] for name in r.theirs]
        joined = torch.cat([p.reshape(-1, *p.shape[1:]) if p.ndim else p.reshape(1) for p in parts])
        sizes = [shapes[name].numel() for name in r.ours]
        for name, flat in zip(r.ours, joined.reshape(-1).split(sizes)):
            out[name] = flat.reshape(shapes[name]).contiguous()
    unmapped = set(shapes) - set(out)
    if unmapped:
        raise RosettaError(f"{source}: no weights for {sorted(unmapped)[0]}")
    return out


def to_theirs(rules: list[Rule], ours: dict[str, torch.Tensor],
              shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Convert our state dict to theirs; their tensors in a group are split evenly, or by the sizes of `shapes`
    where it gives all of them (grouped-query attention's q, k and v differ)."""
    shapes = shapes or {}
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        joined = torch.cat([ours[name].reshape(-1, *ours[name].shape[1:]) if ours[name].ndim else ours[name].reshape(1)
                            for name in r.ours])
        if len(r.theirs) > 1 and all(name in shapes for name in r.theirs):
            parts = joined.split([shapes[name][0] for name in r.theirs])
        else:
            parts = joined.chunk(len(r.theirs))
        for name, part in zip(r.theirs, parts):
            part = part.T if r.transpose else part
            if name in shapes:
                part = part.reshape(shapes[name])
            out[name] = part.contiguous()
    return out
