"""Word timestamps: which audio frames each text token attends to, in the cross-attention heads that follow
time (the checkpoint's alignment heads), turned into a monotonic path by dynamic time warping.

As openai/whisper does: the heads' attention over the window's real frames is standardised per frame,
median-filtered along time, averaged over heads; the cheapest monotonic path through its negative
gives each token the frame where it begins; a word starts at its first token's frame and ends where the
next word starts. Punctuation sticks to the word before (or after, for opening marks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rosetta.models.asr import WhisperTokens

TOKENS_PER_SECOND = 50  # audio states per second: 1500 per 30 s
MEDIAN_WIDTH = 7
PREPEND = "\"'“¿([{-"
APPEND = "\"'.。,，!！?？:：”)]}、"
NO_SPACES = {"zh", "ja", "th", "lo", "my", "yue"}


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path (token index, frame index) through `cost` [tokens, frames].

    Filled one anti-diagonal at a time, so that each step is a vector operation.
    """
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        best = np.minimum(np.minimum(total[i - 1, j - 1], total[i - 1, j]), total[i, j - 1])
        total[i, j] = cost[i - 1, j - 1] + best
    i, j = n, m
    path = []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = np.argmin([total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]])
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    path.reverse()
    rows, cols = zip(*path) if path else ((), ())
    return np.array(rows, dtype=int), np.array(cols, dtype=int)


def split_words(tokenizer, text_tokens: list[int], language: str | None) -> tuple[list[str], list[list[int]]]:
    """Words and their tokens: at spaces (and before punctuation) for most languages, per character for the
    languages written without spaces."""
    words: list[str] = []
    pieces: list[list[int]] = []
    current: list[int] = []
    decoded = ""
    for token in text_tokens:
        current.append(token)
        text = tokenizer.decode(current)
        if "\ufffd" in text:
            continue  # a character split over tokens: wait for its other bytes
        if language in NO_SPACES:
            words.append(text)
            pieces.append(current)
        else:
            starts_word = text[:1] == " " or text.strip() in APPEND or text.strip() in PREPEND
            if not words or starts_word or decoded.strip() in PREPEND:
                words.append(text)
                pieces.append(current)
            else:
                words[-1] += text
                pieces[-1] += current
        decoded = text
        current = []
    return words, pieces


def add_word_timestamps(model, window, segments, tokens: WhisperTokens) -> None:
    """Fill each segment's `words` (start, end, word, probability) from one decoded window."""
    from rosetta.speech.transcribe import Word

    text_tokens = [t for s in segments for t in s.tokens if t < tokens.eot]
    if not text_tokens:
        return
    frames = window.size // 2  # audio states of real audio
    heads = model.config.alignment_heads or tuple(
        (layer, head) for layer in range(model.config.decoder_layers // 2, model.config.decoder_layers)
        for head in range(model.config.decoder_heads))
    prefix = window.prompt[window.sot_index :]
    if tokens.no_timestamps not in prefix:
        prefix = [*prefix, tokens.no_timestamps]
    ids = torch.tensor([[*prefix, *text_tokens, tokens.eot]])
    scores: list[torch.Tensor] = []
    logits = model.decoder_logits(ids, window.states[None], scores)[0].float()
    probs = logits.softmax(dim=-1)
    start = len(prefix)
    token_probs = probs[torch.arange(start - 1, start - 1 + len(text_tokens)), torch.tensor(text_tokens)].tolist()

    weights = torch.stack([scores[layer][0, head, :, :frames] for layer, head in heads]).float().softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = (weights - mean) / std.clamp(min=1e-10)
    weights = _median_filter(weights, MEDIAN_WIDTH)
    matrix = weights.mean(dim=0)[start - 1 : -1]  # the no-timestamps token, then each text token
    text_index, time_index = dtw(-matrix.double().numpy())

    words, word_tokens = split_words(model.tokenizer, text_tokens, window.language.code)
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens]), (1, 0))
    jumps = np.pad(np.diff(text_index), (1, 0), constant_values=1).astype(bool)
    jump_times = time_index[jumps] / TOKENS_PER_SECOND
    offset = window.time_offset
    ends = np.cumsum([sum(t < tokens.eot for t in s.tokens) for s in segments])  # text tokens up to each segment
    per_segment: list[list] = [[] for _ in segments]
    for w, (a, b) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        start_time = float(jump_times[min(a, len(jump_times) - 1)])
        end_time = float(jump_times[min(b, len(jump_times) - 1)])
        word = Word(round(offset + start_time, 3), round(offset + max(end_time, start_time), 3), words[w],
                    round(float(np.mean(token_probs[a:b])), 4))
        per_segment[int(np.searchsorted(ends, a, side="right"))].append(word)
    for s, timed in zip(segments, per_segment):
        s.words = _merge_punctuation(timed)
        if s.words:  # the words say where the speech is better than the timestamp tokens do
            s.start, s.end = s.words[0].start, s.words[-1].end


def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of `width` along the last axis (time), reflect-padded."""
    if x.shape[-1] <= width // 2:
        return x
    padded = F.pad(x, (width // 2, width // 2), mode="reflect")
    return padded.unfold(-1, width, 1).sort(dim=-1).values[..., width // 2]


def _merge_punctuation(words: list) -> list:
    """Opening marks join the word after them, closing marks the word before."""
    out = []
    pending = None
    for w in words:
        text = w.word.strip()
        if text and all(c in PREPEND for c in text):
            pending = w if pending is None else type(w)(pending.start, w.end, pending.word + w.word, w.probability)
            continue
        if pending is not None:
            w = type(w)(pending.start, w.end, pending.word + w.word, min(pending.probability, w.probability))
            pending = None
        if out and text and all(c in APPEND for c in text):
            last = out[-1]
            out[-1] = type(w)(last.start, w.end, last.word + w.word, min(last.probability, w.probability))
        else:
            out.append(w)
    if pending is not None:
        out.append(pending)
    return out
