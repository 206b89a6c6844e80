"""Voice activity: where in a recording someone speaks, by the silero-vad model (its own package and weights,
loaded once per process). Transcription then decodes only the speech, each chunk a window of its own."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from rosetta.errors import RosettaError
from rosetta.modalities.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE


@functools.cache
def _model():
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        raise RosettaError("voice-activity detection needs the silero-vad package (pip install silero-vad)") from None
    with warnings.catch_warnings():  # it ships a TorchScript model, which torch now calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return load_silero_vad()


def speech_chunks(waveform: np.ndarray, threshold: float = 0.5, min_silence_ms: int = 500,
                  pad_ms: int = 200) -> list[tuple[int, int]]:
    """(start, end) mel frames of the speech in 16 kHz samples, each at most one window (30 s) long."""
    from silero_vad import get_speech_timestamps

    with torch.inference_mode():
        spans = get_speech_timestamps(torch.from_numpy(waveform), _model(), threshold=threshold,
                                      sampling_rate=SAMPLE_RATE, min_silence_duration_ms=min_silence_ms,
                                      speech_pad_ms=pad_ms, max_speech_duration_s=N_FRAMES * HOP_LENGTH / SAMPLE_RATE
                                      - 1)
    return [(s["start"] // HOP_LENGTH, -(-s["end"] // HOP_LENGTH)) for s in spans]
