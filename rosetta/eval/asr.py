"""Speech recognition: word and character error rates (jiwer) after Whisper's English text normalisation,
and the real-time factor (seconds of computing per second of audio).

Records have an "audio" (a path or bytes) and a "text" (what is said in it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence


@functools.cache
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalisation: lower case, no punctuation, numbers as digits, British spellings
    American, contractions and fillers handled, as the WER figures of Whisper's paper are computed."""
    return _normalizer()(text)


def with_speech(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r.get("audio") is not None and isinstance(r.get("text"), str)]


def asr(model, records: Sequence[dict], batch_size: int = 8, on_error: Callable[[Exception], None] | None = None,
        **options) -> dict[str, float]:
    """WER, CER and the real-time factor of `model` transcribing the records' audio (options: transcribe's)."""
    import jiwer

    from rosetta.speech.transcribe import transcribe_many

    records = with_speech(records)
    start = time.perf_counter()
    results = transcribe_many(model, [r["audio"] for r in records], batch_size=batch_size, on_error=(
        None if on_error is None else lambda audio, e: on_error(e)), **options)
    seconds = time.perf_counter() - start
    pairs = [(normalize(r["text"]), normalize(t.text)) for r, t in zip(records, results) if t is not None]
    pairs = [(truth, said) for truth, said in pairs if truth]
    if not pairs:
        return {}
    truths, hypotheses = zip(*pairs)
    audio = sum(t.duration for t in results if t is not None)
    return {"wer": round(jiwer.wer(list(truths), list(hypotheses)), 4),
            "cer": round(jiwer.cer(list(truths), list(hypotheses)), 4),
            "rtf": round(seconds / audio, 4) if audio else float("nan"),
            "audio_seconds": round(audio, 1), "n": len(pairs)}
