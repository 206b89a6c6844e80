"""The text-generation tasks on any model with a tokenizer and a decoder: options in, completions out.

`request()` turns the options people pass (temperature, top_p, stop, json_schema, seed, ...) into an engine
`Request`, filling what is not given from the checkpoint's generation defaults; `complete()` and
`stream()` run them (beam search when `num_beams` > 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rosetta.errors import InputError
from rosetta.generation.engine import Completion, Engine, LogitsProcessor, Request

MAX_BATCH = 32  # sequences decoded together by generate(); more prompts wait for a free row


def request(model, prompt: list[int], max_new_tokens: int = 256, *, temperature: float | None = None,
            top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
            repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
            json_schema: dict | str | None = None, seed: int | None = None, ignore_eos: bool = False,
            truncate: bool = False, logits_processors: Sequence[LogitsProcessor] = (),
            prompt_embeds: torch.Tensor | None = None) -> Request:
    context = model.context_length
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    if seed is not None and not 0 <= seed < 2**63:
        raise InputError("seed: an integer in [0, 2**63)")
    if len(prompt) >= context:
        if not truncate or prompt_embeds is not None:
            raise InputError(f"prompt: {len(prompt)} tokens; the model's context window is {context} "
                             "(shorten it, or pass truncate=True to keep its end)")
        prompt = prompt[-max(1, context - max_new_tokens) :]
    sampling = model.config.sampling.updated(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                             repetition_penalty=repetition_penalty)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    constraint = model.grammars.json_schema(json_schema) if json_schema is not None else None
    return Request(prompt=list(prompt), max_new_tokens=max_new_tokens, sampling=sampling,
                   stop_ids=frozenset(model.stop_ids()), stop=stop, seed=seed, constraint=constraint,
                   processors=tuple(logits_processors), ignore_eos=ignore_eos, prompt_embeds=prompt_embeds)


def engine(model, slots: int, capacity: int, compile: bool = False) -> Engine:
    return Engine(model, model.tokenizer.decode, max_batch=slots, capacity=capacity, compile=compile)


@torch.inference_mode()
def complete(model, prompts: Sequence[list[int]], max_new_tokens: int = 256, *, num_beams: int = 1,
             length_penalty: float = 1.0, prompt_embeds: Sequence[torch.Tensor | None] | None = None,
             compile: bool = False, **options: Any) -> list[Completion]:
    """One completion per prompt (token ids; with `prompt_embeds`, each prompt's embeddings, images spliced in),
    decoded together; `compile`: decode steps through torch.compile (`rosetta.generation.engine.compiled_decoder`)."""
    embeds = list(prompt_embeds) if prompt_embeds is not None else [None] * len(prompts)
    requests = [request(model, p, max_new_tokens, prompt_embeds=e, **options) for p, e in zip(prompts, embeds)]
    if num_beams > 1:
        from rosetta.generation.beam import beam_search

        if any(not r.sampling.greedy or r.constraint is not None or r.stop for r in requests):
            raise InputError("beam search takes no temperature, stop strings or json_schema")
        if any(e is not None for e in embeds):
            raise InputError("beam search decodes text prompts only (no images)")
        return [beam_search(model, r.prompt, num_beams=num_beams, max_new_tokens=r.max_new_tokens,
                            stop_ids=r.stop_ids, length_penalty=length_penalty, processors=_penalty(r),
                            decode=model.tokenizer.decode) for r in requests]
    if not requests:
        return []
    capacity = max(len(r.prompt) for r in requests) + max(r.max_new_tokens for r in requests)
    return engine(model, min(len(requests), MAX_BATCH), capacity, compile).generate(requests)


def stream(model, prompt: list[int], max_new_tokens: int = 256, compile: bool = False,
           **options: Any) -> Iterator[str]:
    """Text deltas of one completion, as tokens are made."""
    r = request(model, prompt, max_new_tokens, **options)
    run = engine(model, 1, len(r.prompt) + r.max_new_tokens, compile)
    with torch.inference_mode():
        for event in run.run([r]):
            if event.sequence.error is not None:
                raise event.sequence.error
            if event.text:
                yield event.text


def _penalty(r: Request) -> tuple[LogitsProcessor, ...]:
    """Beam search's processors: the request's own, after the repetition penalty if one is asked for."""
    from rosetta.generation.sampling import penalize_repetition

    if r.sampling.repetition_penalty == 1:
        return r.processors

    def penalty(ids: list[int], log_probs: torch.Tensor) -> torch.Tensor:
        log_probs = log_probs.clone()
        penalize_repetition(log_probs, torch.tensor(ids, device=log_probs.device), r.sampling.repetition_penalty)
        return log_probs

    return (penalty, *r.processors)
