"""Decoding one 30-second window as Whisper does: the prompt, the token rules, and the temperature fallback.

The rules are openai/whisper's (and CTranslate2's): some tokens are never generated; the first token is
never a blank or end-of-text; with timestamps, the first token is a timestamp no later than
`max_initial_timestamp`, timestamps come in pairs and never go back, and a timestamp is forced whenever
the timestamps together are likelier than any text token.

A window is decoded greedily (or by beam search) first; if the text is too repetitive (its compression
ratio is high) or too unlikely (average log-probability low), it is decoded again by sampling at the next
temperature, unless the window looks silent (the no-speech probability high and the text unlikely).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from rosetta.models.asr import WhisperTokens

TIME_PRECISION = 0.02  # seconds per timestamp token
FRAMES_PER_TOKEN = 2  # mel frames (10 ms each) per timestamp step


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # or "translate" (to English; multilingual models)
    language: str | None = None  # None: detected from the first window
    beam_size: int = 1  # 1: greedy at temperature 0
    best_of: int = 5  # samples drawn at each fallback temperature, the likeliest kept
    length_penalty: float = 1.0
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | None = None
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] | None = None  # None: the checkpoint's list
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    word_timestamps: bool = False
    seed: int | None = 0  # of the fallback samples


@dataclass
class WindowResult:
    tokens: list[int]  # text and timestamp tokens, without end-of-text
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    text: str = ""
    extra: dict = field(default_factory=dict)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def prompt_tokens(tokens: WhisperTokens, previous: list[int], options: DecodingOptions, language: str | None,
                  max_length: int) -> tuple[list[int], int]:
    """The decoder prompt of a window, and the index of its start-of-transcript token."""
    prompt: list[int] = []
    if previous:
        prompt = [tokens.sot_prev, *previous[-(max_length // 2 - 1) :]]
    sot_index = len(prompt)
    prompt.append(tokens.sot)
    if tokens.languages:
        prompt.append(tokens.languages[language or "en"])
        prompt.append(tokens.translate if options.task == "translate" else tokens.transcribe)
    if options.without_timestamps:
        prompt.append(tokens.no_timestamps)
    return prompt, sot_index


class WhisperRules:
    """Whisper's token rules as a logits processor (ids so far, one row of logits) -> logits."""

    def __init__(self, tokens: WhisperTokens, prompt_length: int, suppress: tuple[int, ...], suppress_blank: bool,
                 timestamps: bool, max_initial_timestamp_index: int | None, blank: int | None):
        self.t = tokens
        self.begin = prompt_length
        self.suppress = torch.tensor(sorted(set(suppress)), dtype=torch.long)
        self.suppress_blank = suppress_blank
        self.timestamps = timestamps
        self.max_initial = max_initial_timestamp_index
        self.begin_suppress = [i for i in (blank, tokens.eot) if i is not None]

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        t = self.t
        sampled = ids[self.begin :]
        if len(self.suppress):
            logits[self.suppress.to(logits.device)] = -torch.inf
        if self.suppress_blank and not sampled:
            logits[self.begin_suppress] = -torch.inf
        if not self.timestamps:
            logits[t.timestamp_begin :] = -torch.inf
            return logits
        logits[t.no_timestamps] = -torch.inf
        last = len(sampled) >= 1 and sampled[-1] >= t.timestamp_begin
        penultimate = len(sampled) < 2 or sampled[-2] >= t.timestamp_begin
        if last:
            if penultimate:  # a pair just closed: text (or end-of-text) comes next
                logits[t.timestamp_begin :] = -torch.inf
            else:  # an opened pair: its closing timestamp (or end-of-text) comes next
                logits[: t.eot] = -torch.inf
        stamps = [i for i in sampled if i >= t.timestamp_begin]
        if stamps:  # timestamps never go back; a closing one may repeat the opening one
            floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
            logits[t.timestamp_begin : floor] = -torch.inf
        if not sampled:
            logits[: t.timestamp_begin] = -torch.inf
            if self.max_initial is not None:
                logits[t.timestamp_begin + self.max_initial + 1 :] = -torch.inf
        logprobs = logits.float().log_softmax(dim=-1)
        if logprobs[t.timestamp_begin :].logsumexp(dim=-1) > logprobs[: t.timestamp_begin].max():
            logits[: t.timestamp_begin] = -torch.inf
        return logits


def needs_fallback(result: WindowResult, options: DecodingOptions) -> bool:
    fallback = False
    threshold = options.compression_ratio_threshold
    if threshold is not None and result.compression_ratio > threshold:
        fallback = True
    low = options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold
    if low:
        fallback = True
    if options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold and low:
        fallback = False  # silence: decoding again would only invent words
    return fallback
