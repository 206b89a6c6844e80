"""Long-form transcription: 30-second windows decoded one after another, each starting where the last
finished speaking (the seek rule), conditioned on the text before it.

    audio ─▶ log-mel of the whole recording (block by block for long ones) ─▶ window at `seek`
          ─▶ encoder ─▶ decode with fallback ─▶ segments between timestamp pairs ─▶ seek to the last one

Several recordings are transcribed together: each keeps its own loop, and the windows of all of them that
are due go through the encoder as one batch and through the generation engine as one batch of rows.
Speech chunks found by voice-activity detection are windows of their own, batched the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rosetta.errors import InputError
from rosetta.generation.engine import Engine, Request
from rosetta.generation.sampling import SamplingParams
from rosetta.modalities.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, AudioInput, audio_blocks, log_mel_spectrogram
from rosetta.speech.decoding import (
    FRAMES_PER_TOKEN,
    TIME_PRECISION,
    DecodingOptions,
    WhisperRules,
    WindowResult,
    compression_ratio,
    needs_fallback,
    prompt_tokens,
)

BLOCK_SECONDS = 30 * 60  # a long recording's features are computed this much at a time


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    words: list[Word] | None = None
    seek: int = 0


@dataclass
class Transcription:
    segments: list[Segment]
    language: str | None
    language_probability: float | None
    duration: float  # seconds of audio

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()


def transcribe(model, audio: AudioInput, **options) -> Transcription:
    """What is said in one recording; see `transcribe_many` for the options."""
    return transcribe_many(model, [audio], **options)[0]


def transcribe_many(model, audios: Sequence[AudioInput], batch_size: int = 8, vad: bool = False,
                    progress: bool | None = None, on_error: Callable[[AudioInput, Exception], None] | None = None,
                    compile: bool = False, **options) -> list[Transcription | None]:
    """Transcriptions of several recordings, decoded together. Options are `DecodingOptions`' fields
    (language, task, beam_size, temperatures, word_timestamps, initial_prompt, ...); `vad` skips silence and
    decodes the speech chunks independently; `compile` runs the decoder's steps through torch.compile (compiled
    on first use, then reused: `rosetta.generation.engine.compiled_decoder`). A recording that cannot be read is
    None, and reported to `on_error` (else the error is raised)."""
    decoding = DecodingOptions(**options)
    if decoding.task not in ("transcribe", "translate"):
        raise InputError(f"task: {decoding.task!r} is not 'transcribe' or 'translate'")
    tokens = model.tokens
    if decoding.task == "translate" and not tokens.languages:
        raise InputError("task='translate' needs a multilingual model (this one is English-only)")
    if decoding.language is not None and tokens.languages and decoding.language not in tokens.languages:
        raise InputError(f"language: {decoding.language!r} is not one of this model's languages")
    jobs = []
    for audio in audios:
        try:
            jobs.append(_Recording(model, audio, decoding, vad))
        except InputError as e:
            if on_error is None:
                raise
            on_error(audio, e)
            jobs.append(None)
    total = sum(j.duration for j in jobs if j is not None)
    show = progress if progress is not None else total > 60
    with torch.inference_mode(), tqdm(total=round(total, 1), unit="s", desc="audio", disable=not show or None,
                                      leave=False) as bar:
        recordings = [j for j in jobs if j is not None]
        # Each recording has one window due at a time: the engine's cache needs no more rows than that.
        _Decoder(model, decoding, max(1, min(batch_size, len(recordings))), compile).run(recordings, bar)
    return [None if j is None else j.result() for j in jobs]


def decode(model, mel: torch.Tensor, prompt: str | None = None, **options) -> WindowResult:
    """One 30-second window of log-mel features [n_mels, 3000], decoded with the fallback rules: its tokens
    (text and timestamps), average log-probability, compression ratio, no-speech probability and
    temperature (as openai/whisper's `decode`). `prompt` is text the window continues."""
    decoding = DecodingOptions(**options)
    tokens = model.tokens
    previous = model.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False) if prompt else []
    language = decoding.language if tokens.languages else None
    with torch.inference_mode():
        ids, sot_index = prompt_tokens(tokens, previous, decoding, language, model.context_length)
        window = _Window(_Language(language), mel, 0.0, N_FRAMES, ids, sot_index)
        window.states = model.encode(mel[None])[0]
        decoder = _Decoder(model, decoding, 1)
        decoder._detect_languages([window])
        return decoder._decode([window])[0]


@dataclass
class _Language:
    """What a recording is spoken in: given, or detected from its first window."""

    code: str | None
    probability: float | None = None


@dataclass
class _Window:
    language: _Language  # the recording's, shared by its windows
    mel: torch.Tensor  # [n_mels, 3000]
    time_offset: float
    size: int  # frames of real audio in the window
    prompt: list[int]
    sot_index: int
    states: torch.Tensor | None = None


class _Recording:
    """One recording's loop: its features, where it has got to, its text so far."""

    def __init__(self, model, audio: AudioInput, options: DecodingOptions, vad: bool):
        self.model, self.options = model, options
        self.tokens = model.tokens
        self.features = audio_blocks(audio, SAMPLE_RATE, block_seconds=BLOCK_SECONDS)
        self.duration = 0.0
        self.segments: list[Segment] = []
        self.language = _Language(options.language if self.tokens.languages else None)
        self.all_tokens: list[int] = []
        if options.initial_prompt:
            self.all_tokens = model.tokenizer.encode(" " + options.initial_prompt.strip(), add_special_tokens=False)
        self.prompt_reset_since = 0
        self.clips: list[tuple[int, int]] | None = None  # voice-activity chunks, in frames
        self.vad = vad
        self.block: torch.Tensor | None = None  # features of the block being read [n_mels, frames]
        self.block_start = 0  # its first frame, in the whole recording
        self.seek = 0
        self.finished = False
        self._next_block()

    def _next_block(self) -> None:
        waveform = next(self.features, None)
        if waveform is None:
            if self.block is None:
                raise InputError("no audio (zero samples)")
            self.finished = True
            return
        if self.block is not None:
            self.block_start += self.block.shape[-1]
        self.duration += len(waveform) / SAMPLE_RATE
        if self.vad:
            from rosetta.speech.vad import speech_chunks

            offset = self.block_start
            self.clips = [(offset + a, offset + b) for a, b in speech_chunks(waveform)]
        # Whisper's features for the block: the samples then 160 zeros (one more frame), normalised together.
        mel = log_mel_spectrogram(np.concatenate([waveform, np.zeros(HOP_LENGTH, np.float32)]),
                                  self.model.config.n_mels)
        self.block = mel[:, :-1]

    def next_window(self) -> _Window | None:
        """The next window to decode, or None once the recording is done."""
        while not self.finished:
            end = self.block_start + self.block.shape[-1]
            if self.clips is not None:
                self.clips = [(a, b) for a, b in self.clips if b > self.seek]
                if not self.clips:
                    self.seek = end
                elif self.seek < self.clips[0][0]:
                    self.seek = self.clips[0][0]
            if self.seek >= end:
                self._next_block()
                continue
            limit = self.clips[0][1] if self.clips else end
            size = min(N_FRAMES, limit - self.seek)
            local = self.seek - self.block_start
            # A window reaching past the block is cut at its end (blocks are long) and padded like the last one.
            mel = torch.nn.functional.pad(self.block[:, local : local + size], (0, N_FRAMES - size))
            previous = self.all_tokens[self.prompt_reset_since :] if self.options.condition_on_previous_text else []
            if self.clips is not None:
                previous = []  # speech chunks are independent
            prompt, sot_index = prompt_tokens(self.tokens, previous, self.options, self.language.code,
                                              self.model.context_length)
            return _Window(self.language, mel, self.seek * HOP_LENGTH / SAMPLE_RATE, size, prompt, sot_index)
        return None

    def take(self, window: _Window, result: WindowResult) -> float:
        """Add a decoded window's segments and move on; the seconds of audio it covered."""
        before = self.seek
        o = self.options
        silent = o.no_speech_threshold is not None and result.no_speech_prob > o.no_speech_threshold
        if silent and not (o.log_prob_threshold is not None and result.avg_logprob > o.log_prob_threshold):
            self.seek += window.size
            return (self.seek - before) * HOP_LENGTH / SAMPLE_RATE
        segments, self.seek = self._split(window, result)
        if o.word_timestamps and segments:
            from rosetta.speech.alignment import add_word_timestamps

            add_word_timestamps(self.model, window, segments, self.tokens)
        for s in segments:
            if s.start == s.end or not s.text.strip():
                continue
            s.id = len(self.segments)
            self.segments.append(s)
            self.all_tokens.extend(s.tokens)
        if not o.condition_on_previous_text or result.temperature > o.prompt_reset_on_temperature:
            self.prompt_reset_since = len(self.all_tokens)
        return (self.seek - before) * HOP_LENGTH / SAMPLE_RATE

    def _split(self, window: _Window, result: WindowResult) -> tuple[list[Segment], int]:
        """Segments between consecutive timestamp pairs, and where the next window starts."""
        t, tokens = self.tokens, result.tokens
        seek, offset = self.seek, window.time_offset
        is_stamp = [i >= t.timestamp_begin for i in tokens]
        single_ending = len(tokens) >= 2 and not is_stamp[-2] and is_stamp[-1]
        consecutive = [i for i in range(1, len(tokens)) if is_stamp[i] and is_stamp[i - 1]]

        def segment(start: float, end: float, pieces: list[int]) -> Segment:
            text = self.model.tokenizer.decode([i for i in pieces if i < t.eot])
            return Segment(0, round(start, 3), round(end, 3), text, pieces, result.avg_logprob,
                           result.compression_ratio, result.no_speech_prob, result.temperature, seek=seek)

        segments = []
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for current in slices:
                pieces = tokens[last:current]
                segments.append(segment(offset + (pieces[0] - t.timestamp_begin) * TIME_PRECISION,
                                        offset + (pieces[-1] - t.timestamp_begin) * TIME_PRECISION, pieces))
                last = current
            if single_ending:
                seek += window.size
            else:
                seek += (tokens[last - 1] - t.timestamp_begin) * FRAMES_PER_TOKEN
        else:
            duration = window.size * HOP_LENGTH / SAMPLE_RATE
            stamps = [i for i in tokens if i >= t.timestamp_begin]
            if stamps and stamps[-1] != t.timestamp_begin:
                duration = (stamps[-1] - t.timestamp_begin) * TIME_PRECISION
            segments.append(segment(offset, offset + duration, tokens))
            seek += window.size
        return segments, seek

    def result(self) -> Transcription:
        return Transcription(self.segments, self.language.code, self.language.probability, round(self.duration, 3))


class _Decoder:
    """Runs the windows that are due, of every recording, through the encoder and the engine together."""

    def __init__(self, model, options: DecodingOptions, batch_size: int, compile: bool = False):
        self.model, self.options, self.batch_size = model, options, batch_size
        self.tokens = model.tokens
        self.suppress = tuple(i for i in (options.suppress_tokens if options.suppress_tokens is not None
                                          else model.config.suppress_tokens) if 0 <= i < model.config.vocab_size)
        blank = model.tokenizer.encode(" ", add_special_tokens=False)
        self.blank = blank[0] if len(blank) == 1 else None
        eot = self.tokens.eot
        self.engine = Engine(model, lambda ids: model.tokenizer.decode([i for i in ids if i < eot]),
                             max_batch=batch_size * max(options.best_of, options.beam_size, 1),
                             capacity=model.context_length, compile=compile)

    def run(self, recordings: list[_Recording], bar) -> None:
        active = list(recordings)
        while active:
            windows = []
            for r in list(active):
                w = r.next_window()
                if w is None:
                    active.remove(r)
                    bar.update(max(0.0, round(r.duration, 1) - bar.n) if len(active) == 0 else 0)
                else:
                    windows.append((r, w))
                if len(windows) == self.batch_size:
                    break
            if not windows:
                continue
            states = self.model.encode(torch.stack([w.mel for _, w in windows]))
            for (_, w), s in zip(windows, states):
                w.states = s
            self._detect_languages([w for _, w in windows])
            for (recording, w), result in zip(windows, self._decode([w for _, w in windows])):
                bar.update(recording.take(w, result))

    def _detect_languages(self, windows: list[_Window]) -> None:
        pending = [w for w in windows if self.tokens.languages and w.language.code is None]
        if not pending:
            return
        ids = torch.full((len(pending), 1), self.tokens.sot)
        logits = self.model.decoder_logits(ids, torch.stack([w.states for w in pending]))[:, 0].float()
        codes = list(self.tokens.languages)
        probs = logits[:, [self.tokens.languages[c] for c in codes]].softmax(dim=-1)
        for w, p in zip(pending, probs):
            best = int(p.argmax())
            w.language.code, w.language.probability = codes[best], round(float(p[best]), 4)
            w.prompt, w.sot_index = prompt_tokens(self.tokens, w.prompt[1 : w.sot_index] if w.sot_index else [],
                                                  self.options, w.language.code, self.model.context_length)

    def _decode(self, windows: list[_Window]) -> list[WindowResult]:
        """Each window decoded, falling back to higher temperatures where the text is repetitive or unlikely."""
        results: list[WindowResult | None] = [None] * len(windows)
        candidates: list[list[WindowResult]] = [[] for _ in windows]
        todo = list(range(len(windows)))
        for temperature in self.options.temperatures:
            if not todo:
                break
            decoded = self._at_temperature([windows[i] for i in todo], temperature)
            still = []
            for i, result in zip(todo, decoded):
                candidates[i].append(result)
                if needs_fallback(result, self.options):
                    still.append(i)
                else:
                    results[i] = result
            todo = still
        for i in todo:  # nothing passed: the likeliest of those not too repetitive
            threshold = self.options.compression_ratio_threshold
            fine = [c for c in candidates[i] if threshold is None or c.compression_ratio <= threshold]
            best = max(fine or candidates[i], key=lambda c: c.avg_logprob)
            best.temperature = self.options.temperatures[-1]
            results[i] = best
        return results

    def _at_temperature(self, windows: list[_Window], temperature: float) -> list[WindowResult]:
        o = self.options
        if temperature == 0 and o.beam_size > 1:
            return [self._beam(w) for w in windows]
        samples = 1 if temperature == 0 else o.best_of
        sequences = []
        for n, w in enumerate(windows):
            rules = WhisperRules(self.tokens, len(w.prompt), self.suppress, o.suppress_blank, not o.without_timestamps,
                                 None if o.max_initial_timestamp is None else round(o.max_initial_timestamp /
                                                                                    TIME_PRECISION), self.blank)
            for k in range(samples):
                seed = None if o.seed is None else o.seed + 1000 * n + k
                request = Request(prompt=w.prompt, max_new_tokens=self.model.context_length - len(w.prompt),
                                  sampling=SamplingParams(temperature=temperature),
                                  stop_ids=frozenset({self.tokens.eot}), seed=seed, processors=(rules,),
                                  context=w.states, logprobs=True, probe=w.sot_index if k == 0 else None)
                sequences.append(self.engine.submit(request))
        while self.engine.busy:
            self.engine.step()
        out = []
        for n in range(len(windows)):
            group = [s.completion() for s in sequences[n * samples : (n + 1) * samples]]
            best = max((self._result(c.tokens, c.logprobs, temperature) for c in group), key=lambda r: r.avg_logprob)
            best.no_speech_prob = self._no_speech_prob(group[0].probe_logits)
            out.append(best)
        return out

    def _beam(self, w: _Window) -> WindowResult:
        from rosetta.generation.beam import beam_search

        o = self.options
        rules = WhisperRules(self.tokens, len(w.prompt), self.suppress, o.suppress_blank, not o.without_timestamps,
                             round(o.max_initial_timestamp / TIME_PRECISION), self.blank)
        completion = beam_search(self.model, w.prompt, num_beams=o.beam_size,
                                 max_new_tokens=self.model.context_length - len(w.prompt),
                                 stop_ids=frozenset({self.tokens.eot}), length_penalty=o.length_penalty,
                                 processors=(rules,), context=w.states)
        result = self._result(completion.tokens, [], 0.0)
        ids = torch.tensor([w.prompt[: w.sot_index + 1]])  # beam search has its own prefill: one more pass
        result.no_speech_prob = self._no_speech_prob(self.model.decoder_logits(ids, w.states[None])[0, -1])
        generated = len(completion.tokens) + (completion.finish_reason == "stop")  # with end-of-text
        result.avg_logprob = completion.score * generated**o.length_penalty / (len(completion.tokens) + 1)
        return result

    def _result(self, tokens: list[int], logprobs: list[float], temperature: float) -> WindowResult:
        text = self.model.tokenizer.decode([i for i in tokens if i < self.tokens.eot]).strip()
        avg = sum(logprobs) / (len(tokens) + 1)
        return WindowResult(tokens, avg, compression_ratio(text), 0.0, temperature, text)

    def _no_speech_prob(self, logits: torch.Tensor) -> float:
        """The probability of <|nospeech|> from the logits after a window's start-of-transcript token."""
        return float(logits.float().softmax(dim=-1)[self.tokens.no_speech])


def format_timestamp(seconds: float, always_hours: bool = False, decimal: str = ".") -> str:
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0.0
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    prefix = f"{hours:02d}:" if always_hours or hours else ""
    return f"{prefix}{minutes:02d}:{secs:02d}{decimal}{milliseconds:03d}"

