"""The decode loop every decoder shares: prefill, KV cache, choosing tokens, stopping, continuous batching.

The engine drives any `Decoder`: a module that maps token ids (or input embeddings), their positions and a
cache window to logits, and makes its own cache. It never knows which family it drives.

Sequences live in the rows of one preallocated cache. A step either admits waiting requests (one prefill
pass over all of them, left-padded to the longest) or decodes one token for every running row; a request
that arrives while others decode joins at the next step, and a row that finishes frees its slot at once.
All rows share one column clock (see `rosetta.nn.cache`): a newcomer's prompt is written so that it ends
at the current column, which is what left padding is in a static batch.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rosetta.errors import InputError
from rosetta.generation.constraints import JsonConstraint
from rosetta.generation.sampling import SamplingParams, new_generator, penalize_repetition, sample, warp
from rosetta.generation.streaming import TextStream
from rosetta.nn.cache import CacheWindow, KVCache
from rosetta.nn.compiler import prepare_compiler

# A logits processor sees the ids so far (prompt and output) and one row of logits [V], and returns logits.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class Decoder(Protocol):
    context_length: int
    device: torch.device

    def new_cache(self, slots: int, capacity: int) -> KVCache: ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, ids: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                 positions: torch.Tensor, window: CacheWindow, last: int | None = None) -> torch.Tensor: ...
    # -> logits [B, L, V], or [B, last, V] of the last positions only

    # An encoder-decoder also has `bind(cache, rows, contexts)`: write the cross-attention keys and values of
    # each admitted row's context (its encoder output) into the cache.


_COMPILED: dict[type, Callable[..., torch.Tensor]] = {}  # per model class: the compiled `forward`
log = logging.getLogger("rosetta.generation")


def compiled_decoder(model: Decoder) -> Callable[..., torch.Tensor]:
    """The model's forward through `torch.compile`, for decode steps.

    A decode step is a few hundred small operations on one token a row, and on a CPU their dispatch costs more
    than their arithmetic: compiled, the elementwise work between the matrix products fuses into a few dozen
    kernels. Sizes are symbolic from the start, so a growing context never recompiles; a handful of graphs
    (one row or several, masked or not) cover a server's traffic, the first of them about a minute's
    compilation on two cores for a 30-layer model. Prefills keep the eager path: their large products are
    where the time goes, and compiling them buys little.

    The class's forward is compiled, not the instance's: nothing is kept on the model, so copies and pickles
    of it stay plain modules, and each instance is an input the compiled code is guarded on.
    """
    forward = _COMPILED.get(type(model))
    if forward is None:
        prepare_compiler()
        forward = _COMPILED[type(model)] = torch.compile(type(model).forward, dynamic=True)
    return functools.partial(forward, model)


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()  # end-of-sequence tokens: stop, and are not part of the text
    stop: tuple[str, ...] = ()  # stop strings: stop, and are not part of the text
    seed: int | None = None
    constraint: JsonConstraint | None = None
    processors: tuple[LogitsProcessor, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)
    prompt_embeds: torch.Tensor | None = None  # [len(prompt), width]: the prompt as embeddings (images spliced in)
    context: torch.Tensor | None = None  # what an encoder-decoder's cross-attention reads (Whisper: audio states)
    logprobs: bool = False  # record each chosen token's log-probability (after the processors, at temperature 1)
    # A prompt position whose next-token logits, as the model gives them, the completion returns too: Whisper's
    # no-speech probability is read after its start-of-transcript token, which need not end the prompt.
    probe: int | None = None


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-sequence, stop string, grammar complete), "length", "cancelled", "error"
    prompt_tokens: int
    seconds_to_first_token: float | None
    logprobs: list[float] = field(default_factory=list)  # of each token, when the request asked for them
    score: float | None = None  # beam search: the hypothesis' log-probability over length ** length_penalty
    probe_logits: torch.Tensor | None = None  # [V] float, after the request's `probe` position


class Generation:
    """One request being decoded: its tokens so far, its text stream and its stopping state."""

    def __init__(self, request: Request, decode: Callable[[list[int]], str], device: torch.device):
        self.request = request
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stream = TextStream(decode, request.stop)
        self.generator = None if request.sampling.greedy else new_generator(request.seed, device)
        self.finish_reason: str | None = None
        self.error: Exception | None = None  # why it stopped, when finish_reason is "error"
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.position = len(request.prompt)  # of the next token
        self.probe_logits: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop decoding this sequence at the next step (a client went away)."""
        self.cancelled = True

    def completion(self) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        return Completion(self.stream.text, list(self.tokens), self.finish_reason or "cancelled",
                          len(self.request.prompt), ttft, list(self.logprobs), probe_logits=self.probe_logits)


@dataclass
class Event:
    sequence: Generation
    text: str  # new text ("" while a character or a stop string is still open)
    finished: bool


class Engine:
    def __init__(self, model: Decoder, decode: Callable[[list[int]], str], max_batch: int = 8,
                 capacity: int = 256, compile: bool = False):
        """`compile`: run decode steps through `torch.compile` (see `compiled_decoder`)."""
        self.model = model
        self.decoder = compiled_decoder(model) if compile else model  # what decode steps call
        self.decode = decode
        self.max_batch = max_batch
        self.cache = model.new_cache(max_batch, capacity)
        self.rows: list[Generation] = []  # running sequences, in cache slots 0..n-1
        self.first = torch.zeros(max_batch, dtype=torch.long)  # each row's first column
        self.column = 0  # the next column every running row writes
        self.waiting: deque[Generation] = deque()
        self.decoded = 0  # rows the last step decoded together (0: it was a prefill)

    # Requests in

    def submit(self, request: Request) -> Generation:
        context = self.model.context_length
        if not request.prompt:
            raise InputError("prompt: empty (give at least one token)")
        if len(request.prompt) >= context:
            raise InputError(f"prompt: {len(request.prompt)} tokens; the model's context window is {context} "
                             "(shorten it, or ask for truncation)")
        if request.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if request.probe is not None and not 0 <= request.probe < len(request.prompt):
            raise InputError(f"probe: position {request.probe} is not in the {len(request.prompt)}-token prompt")
        sequence = Generation(request, self.decode, self.model.device)
        self.waiting.append(sequence)
        return sequence

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    # The loop

    def step(self) -> list[Event]:
        """Admit waiting requests (a prefill), or else decode one token for every running sequence."""
        events = self._drop_cancelled()
        self.decoded = 0
        if self.waiting and len(self.rows) < self.max_batch:
            return events + self._admit()
        if self.rows:
            return events + self._decode()
        return events

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Generate for `requests` until every one has finished, yielding events as tokens come."""
        for request in requests:
            self.submit(request)
        while self.busy:
            yield from self.step()

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        sequences = [self.submit(r) for r in requests]
        while self.busy:
            self.step()
        failed = next((s.error for s in sequences if s.error is not None), None)
        if failed is not None:
            raise failed
        return [s.completion() for s in sequences]

    # Admitting: one prefill pass over the newcomers, their prompts ending at the current column

    def _admit(self) -> list[Event]:
        free = self.max_batch - len(self.rows)
        group = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        longest = max(len(s.request.prompt) for s in group)
        if not self.rows:
            self.column = 0
        self._make_room(longest)

        n, m = len(self.rows), len(group)
        start = self.column - longest
        device = self.model.device
        ids = torch.zeros(m, longest, dtype=torch.long)
        positions = torch.zeros(m, longest, dtype=torch.long)
        for i, s in enumerate(group):
            length = len(s.request.prompt)
            ids[i, longest - length :] = torch.tensor(s.request.prompt)
            positions[i, longest - length :] = torch.arange(length)
            self.first[n + i] = self.column - length
        window = self.cache.window(slice(n, n + m), start, longest, self.first[n : n + m])
        if any(s.request.context is not None for s in group):
            self.model.bind(self.cache, slice(n, n + m), [s.request.context for s in group])
        embeds = None
        if any(s.request.prompt_embeds is not None for s in group):
            embeds = self.model.embed_tokens(ids.to(device))
            for i, s in enumerate(group):
                if s.request.prompt_embeds is not None:
                    embeds[i, longest - len(s.request.prompt) :] = s.request.prompt_embeds.to(embeds)
        # The last positions' logits: the next token's, and those of any probed position before it.
        tails = [len(s.request.prompt) - s.request.probe for s in group if s.request.probe is not None]
        last = max([1, *tails])
        logits = self.model(None if embeds is not None else ids.to(device), embeds=embeds,
                            positions=positions.to(device), window=window, last=last)
        for i, s in enumerate(group):
            if s.request.probe is not None:
                # a copy: the row may be the next token's, which the processors then edit in place
                s.probe_logits = logits[i, last - len(s.request.prompt) + s.request.probe].float().clone()
        self.rows.extend(group)
        return self._choose(list(range(n, n + m)), logits[:, -1])

    # Decoding: one token for every running row

    def _decode(self) -> list[Event]:
        self._make_room()
        n = self.decoded = len(self.rows)
        device = self.model.device
        ids = torch.tensor([[s.tokens[-1]] for s in self.rows], device=device)
        positions = torch.tensor([[s.position - 1] for s in self.rows], device=device)
        window = self.cache.window(slice(0, n), self.column, 1, self.first[:n])
        try:
            logits = self.decoder(ids, positions=positions, window=window, last=1)[:, -1]
        except Exception as e:  # noqa: BLE001 - a compiler failure (no C++ toolchain...): decode eagerly instead
            if self.decoder is self.model:
                raise
            log.warning("compiled decoding failed (%s: %s); decoding without compiling", type(e).__name__, e)
            self.decoder = self.model
            logits = self.model(ids, positions=positions, window=window, last=1)[:, -1]
        self.column += 1
        return self._choose(list(range(n)), logits)

    def _choose(self, rows: list[int], logits: torch.Tensor) -> list[Event]:
        """Pick the next token of each of `rows` from their logits [len(rows), V]."""
        logits = logits.float()
        sequences = [self.rows[r] for r in rows]
        for i, s in enumerate(sequences):
            self._guarded(s, self._shape, s, logits[i])
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, s in enumerate(sequences) if not (s.finished or s.request.sampling.greedy)]
        if sampled:
            warped = warp(logits[sampled], [sequences[i].request.sampling for i in sampled])
            for i, row in zip(sampled, warped):
                tokens[i] = self._guarded(sequences[i], sample, row, sequences[i].generator)
        for i, s in enumerate(sequences):
            if s.request.logprobs and not s.finished:
                s.logprobs.append(float(logits[i].log_softmax(dim=-1)[tokens[i]]))
        events = [Event(s, "", True) if s.finished else self._accept(s, token) for s, token in zip(sequences, tokens)]
        self._release_finished()
        return events

    @staticmethod
    def _shape(s: Generation, logits: torch.Tensor) -> None:
        """The request's own changes to its row of logits [V], in place: grammar, penalty, processors."""
        r = s.request
        if r.constraint is not None:
            r.constraint.mask(logits)
        if r.sampling.repetition_penalty != 1:
            seen = torch.tensor(r.prompt + s.tokens, device=logits.device)
            penalize_repetition(logits, seen, r.sampling.repetition_penalty)
        for processor in r.processors:
            logits.copy_(processor(r.prompt + s.tokens, logits))
        if r.ignore_eos:
            logits[list(r.stop_ids)] = -torch.inf

    @staticmethod
    def _guarded(s: Generation, fn, *args):
        """fn(*args); if it fails, only this sequence ends (finish_reason "error"), not the others in the batch."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a processor, a grammar or non-finite logits: one row's problem
            s.finish_reason, s.error = "error", e
            return 0

    def _accept(self, s: Generation, token: int) -> Event:
        r = s.request
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        if r.constraint is not None:
            r.constraint.advance(token)
        s.position += 1
        text = ""
        if token in r.stop_ids and not r.ignore_eos:
            s.finish_reason = "stop"
        else:
            s.tokens.append(token)
            text = s.stream.push(token)
            if s.stream.stopped or (r.constraint is not None and r.constraint.finished):
                s.finish_reason = "stop"
            elif len(s.tokens) >= r.max_new_tokens or s.position >= self.model.context_length:
                s.finish_reason = "length"
        if s.finished:
            text += s.stream.finish()
            if s.stream.stopped:  # the last held-back text completed a stop string
                s.finish_reason = "stop"
        return Event(s, text, s.finished)

    # Slots and columns

    def _drop_cancelled(self) -> list[Event]:
        events = []
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            s.finish_reason = "cancelled"
            events.append(Event(s, "", True))
        for s in self.rows:
            if s.cancelled and not s.finished:
                s.finish_reason = "cancelled"
                events.append(Event(s, "", True))
        self._release_finished()
        return events

    def _release_finished(self) -> None:
        """Free the slots of finished rows, moving the last running row into each gap."""
        for i in reversed(range(len(self.rows))):
            if not self.rows[i].finished:
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i, slice(int(self.first[last]), self.column))
                self.first[i] = self.first[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def _make_room(self, before: int = 0) -> None:
        """At least `before` columns before the clock (for a prompt about to be written there) and one after it.

        The running rows' columns move as a block: right, when a prompt is longer than the clock is old; left,
        dropping the columns no row needs any more, when the cache is full; only then does the cache grow.
        """
        n = len(self.rows)
        used_from = int(self.first[:n].min()) if n else self.column
        if self.column < before or self.column + 1 > self.cache.capacity:
            clock = max(before, self.column - used_from)
            self.cache.grow(clock + 1)
            if n and clock != self.column:
                self.cache.shift(slice(0, n), slice(used_from, self.column), clock - self.column)
                self.first[:n] += clock - self.column
            self.column = clock
