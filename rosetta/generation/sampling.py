"""Choosing the next token: greedy, or sampling shaped by temperature, top-k, top-p and min-p, after a
repetition penalty. The transformations are transformers' (same order, same definitions), applied to all
rows of a batch at once; each row samples from its own seeded generator, so a seed gives the same text
whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rosetta.errors import InputError

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (the most likely token every step)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the most likely tokens whose probabilities add up to top_p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or the output

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def greedy(self) -> bool:
        """Temperatures this close to 0 are greedy: dividing logits by them would overflow to infinity."""
        return self.temperature < GREEDY_BELOW

    def updated(self, **changes) -> SamplingParams:
        """A copy with the changes that are not None."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place, on one row: logits of tokens already seen are divided by `penalty` (multiplied, if negative)."""
    scores = logits[seen]
    logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)


def warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over rows [n, V] (float32), each row with its own parameters."""
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = min(max(top_k), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values
        index = torch.tensor([min(t, k) - 1 if t else k - 1 for t in top_k], device=device)
        threshold = kth.gather(1, index[:, None])
        threshold[torch.tensor([t == 0 for t in top_k], device=device)] = -torch.inf
        logits = logits.masked_fill(logits < threshold, -torch.inf)
    # 1 - top_p taken in float64: a top_p just below 1 is 1.0 in float32, but still drops the vanishing tail.
    tail = torch.tensor([1 - p.top_p for p in params], device=device)
    if (tail > 0).any():
        # Ascending order: drop the tokens whose cumulative probability stays within 1 - top_p, never the last.
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= tail[:, None]
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if (min_p > 0).any():
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, -torch.inf)
    return logits


def sample(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from one row of warped logits [V]."""
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
