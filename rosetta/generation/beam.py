"""Beam search: keep the `num_beams` most likely continuations, finish hypotheses at end-of-sequence, and
return the best by log-probability over length ** length_penalty.

The bookkeeping is transformers' (its defaults: the heuristic early stop, finished hypotheses only from
the top `num_beams` candidates, 2 x num_beams candidates kept per step so that enough stay running), so
the same model gives the same beams. The beams are rows of one KV cache, reordered as they survive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rosetta.generation.engine import Completion, Decoder, LogitsProcessor

_DEAD = -1.0e9


def beam_search(model: Decoder, prompt: list[int], *, num_beams: int, max_new_tokens: int,
                stop_ids: frozenset[int], length_penalty: float = 1.0,
                processors: Sequence[LogitsProcessor] = (), decode=None,
                context: torch.Tensor | None = None) -> Completion:
    """The best hypothesis; `context` is an encoder-decoder's (Whisper's audio states), shared by the beams."""
    device = model.device
    length = len(prompt)
    max_new_tokens = min(max_new_tokens, model.context_length - length)
    cache = model.new_cache(num_beams, length + max_new_tokens)
    if context is not None:
        model.bind(cache, slice(0, num_beams), [context] * num_beams)
    first = torch.zeros(num_beams, dtype=torch.long)
    window = cache.window(slice(0, 1), 0, length, first[:1])
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, positions=torch.arange(length, device=device)[None], window=window, last=1)[:, -1]
    cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=device), slice(0, length))
    logits = logits.expand(num_beams, -1)

    keep = max(2, 1 + len(stop_ids)) * num_beams
    running = [[] for _ in range(num_beams)]
    scores = torch.full((num_beams,), _DEAD, device=device)
    scores[0] = 0.0
    finished: list[tuple[float, list[int], bool]] = []  # (score, tokens, ended by end-of-sequence)
    can_improve = True
    for step in range(max_new_tokens):
        log_probs = logits.float().log_softmax(dim=-1)
        for processor in processors:
            log_probs = torch.stack([processor(prompt + running[b], log_probs[b]) for b in range(num_beams)])
        vocab = log_probs.shape[-1]
        top, index = (log_probs + scores[:, None]).flatten().topk(keep)
        beams, tokens = (index // vocab).tolist(), (index % vocab).tolist()
        last = step + 1 == max_new_tokens
        ends = [token in stop_ids or last for token in tokens]
        generated = step + 1
        if can_improve:
            for j in range(num_beams):
                if ends[j]:
                    score = top[j].item() / generated**length_penalty
                    finished.append((score, running[beams[j]] + [tokens[j]], tokens[j] in stop_ids))
            finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        alive = [j for j in range(keep) if not ends[j]][:num_beams]
        if not alive:
            break
        order = torch.tensor([beams[j] for j in alive], device=device)
        running = [running[beams[j]] + [tokens[j]] for j in alive]
        scores = top[alive]
        best_possible = scores[0].item() / generated**length_penalty
        can_improve = len(finished) < num_beams or best_possible > finished[-1][0]
        if not can_improve:
            break
        cache.reorder(order, slice(0, length + step))
        ids = torch.tensor([[r[-1]] for r in running], device=device)
        positions = torch.full((num_beams, 1), length + step, device=device)
        window = cache.window(slice(0, num_beams), length + step, 1, first)
        logits = model(ids, positions=positions, window=window, last=1)[:, -1]

    score, tokens, by_eos = finished[0]
    if by_eos:
        tokens = tokens[:-1]
    text = decode(tokens) if decode is not None else ""
    return Completion(text, tokens, "stop" if by_eos else "length", length, None, score=score)
