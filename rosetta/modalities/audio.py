"""Audio: files, bytes and arrays to mono float32 waveforms at the model's rate, and Whisper's log-mel.

WAV, FLAC and Ogg go through soundfile (libsndfile); anything else libsndfile cannot read — MP3 on older
builds, M4A/AAC, Opus in WebM, the audio track of a video — through PyAV (FFmpeg). Channels are averaged to
mono and the rate converted with soxr, a band-limited resampler (plain interpolation would alias).

Long recordings never need to fit in memory: `audio_blocks` decodes and resamples them block by block, and
`AudioSpans` cuts spans out of that stream in order; `load_audio` reads a whole clip, refusing one longer
than its duration limit.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import torch

from rosetta.errors import InputError

SAMPLE_RATE = 16_000
MAX_SECONDS = 4 * 3600.0  # per clip loaded whole; streamed files have no limit but the caller's

AudioInput = Union[str, os.PathLike, bytes, np.ndarray, torch.Tensor]  # noqa: UP007 - a runtime alias

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aiff", ".aif",
                  ".webm", ".mka"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".m4v"}


class NoAudioTrack(InputError):
    """A container (a video, most often) that holds no sound: an error where sound is asked for, not elsewhere."""


def describe(audio: AudioInput) -> str:
    if isinstance(audio, (str, os.PathLike)):
        return str(audio)
    if isinstance(audio, bytes):
        return f"<{len(audio)} bytes>"
    return f"<array {tuple(audio.shape)}>"


def load_audio(audio: AudioInput, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = MAX_SECONDS,
               source_rate: int | None = None) -> np.ndarray:
    """The whole clip as mono float32 at `sample_rate`. Arrays are taken as samples at `source_rate`
    (default: `sample_rate`), [samples] or [channels, samples]."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return _from_array(audio, sample_rate, source_rate or sample_rate, max_seconds)
    blocks = []
    seconds = 0.0
    for block in audio_blocks(audio, sample_rate):
        blocks.append(block)
        seconds += len(block) / sample_rate
        if max_seconds is not None and seconds > max_seconds:
            raise InputError(f"{describe(audio)}: longer than the limit of {max_seconds:g} s")
    waveform = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if not len(waveform):
        raise InputError(f"{describe(audio)}: no audio (zero samples)")
    return waveform


def audio_blocks(audio: AudioInput, sample_rate: int = SAMPLE_RATE, block_seconds: float = 30.0,
                 source_rate: int | None = None) -> Iterator[np.ndarray]:
    """Mono float32 blocks of about `block_seconds` at `sample_rate`, decoded and resampled as they are read."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        waveform = _from_array(audio, sample_rate, source_rate or sample_rate, None)
        step = int(block_seconds * sample_rate)
        for start in range(0, len(waveform), step):
            yield waveform[start : start + step]
        return
    if isinstance(audio, (str, os.PathLike)) and not Path(audio).is_file():
        raise InputError(f"{audio}: {'is a directory' if Path(audio).is_dir() else 'no such file'}")
    name = describe(audio)
    try:
        yield from _soundfile_blocks(audio, sample_rate, block_seconds)
        return
    except _NotForSoundfile:
        pass
    yield from _pyav_blocks(audio, name, sample_rate, block_seconds)


class AudioSpans:
    """Spans of a recording, asked for in the order of their starts, cut from `audio_blocks` as it is read:
    the samples before the latest start are let go, so that a span and a block are held, never the whole
    recording. A span's samples equal the same slice of `load_audio`'s waveform (the same blocks, joined).

    Raises NoAudioTrack (or InputError) on construction, where `load_audio` would: the first block is read then.
    """

    def __init__(self, audio: AudioInput, sample_rate: int = SAMPLE_RATE, block_seconds: float = 30.0,
                 source_rate: int | None = None):
        self.sample_rate = sample_rate
        self._blocks = audio_blocks(audio, sample_rate, block_seconds, source_rate)
        self._buffer = next(self._blocks, np.zeros(0, np.float32))
        self._offset = 0  # the index, in the whole recording, of the buffer's first sample
        self._ended = False

    def __call__(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) (fewer, or none, past the end of the recording)."""
        if start < self._offset:
            raise ValueError(f"span from sample {start}: before an earlier span's start ({self._offset})")
        pieces, held = [self._buffer], self._offset + len(self._buffer)
        while held < end and not self._ended:
            block = next(self._blocks, None)
            if block is None:
                self._ended = True
            else:
                pieces.append(block)
                held += len(block)
        buffer = np.concatenate(pieces) if len(pieces) > 1 else self._buffer
        self._buffer, self._offset = buffer[min(start - self._offset, len(buffer)) :], start
        return self._buffer[: max(0, end - start)]


class _NotForSoundfile(Exception):
    pass


def _soundfile_blocks(audio, sample_rate: int, block_seconds: float) -> Iterator[np.ndarray]:
    import soundfile as sf

    source = io.BytesIO(audio) if isinstance(audio, bytes) else audio
    try:
        f = sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        raise _NotForSoundfile from None
    name = describe(audio)
    with f:
        resampler = _Resampler(f.samplerate, sample_rate)
        frames = max(1, int(block_seconds * f.samplerate))
        while True:
            try:
                block = f.read(frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise InputError(f"{name}: cannot decode it ({e})") from None
            last = len(block) < frames
            out = resampler(block, last)
            if len(out):
                yield out
            if last:
                return


def _pyav_blocks(audio, name: str, sample_rate: int, block_seconds: float) -> Iterator[np.ndarray]:
    import av

    source = io.BytesIO(audio) if isinstance(audio, bytes) else str(audio)
    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{name}: not an audio or video file FFmpeg can read ({_reason(e)})") from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise NoAudioTrack(f"{name}: has no audio track")
        stream = streams[0]
        # FFmpeg resamples (float32 planes at the model's rate); the channels are averaged here, as for the
        # files soundfile reads: FFmpeg's own downmix to mono scales two channels by 1/sqrt(2), not 1/2.
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        pending: list[np.ndarray] = []
        size, step = 0, int(block_seconds * sample_rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pending.append(out.to_ndarray().mean(axis=0))
                    size += pending[-1].shape[0]
                if size >= step:
                    yield np.concatenate(pending).astype(np.float32, copy=False)
                    pending, size = [], 0
            for out in resampler.resample(None):
                pending.append(out.to_ndarray().mean(axis=0))
        except (av.error.FFmpegError, ValueError) as e:
            raise InputError(f"{name}: cannot decode its audio ({_reason(e)})") from None
        if pending:
            yield np.concatenate(pending).astype(np.float32, copy=False)


def _reason(e: Exception) -> str:
    return str(getattr(e, "strerror", None) or e).splitlines()[0]


class _Resampler:
    """Mono mixdown and band-limited resampling of consecutive blocks [frames, channels] (soxr, streaming)."""

    def __init__(self, source_rate: int, target_rate: int):
        self.stream = None
        if source_rate != target_rate:
            import soxr

            self.stream = soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality="HQ")

    def __call__(self, block: np.ndarray, last: bool) -> np.ndarray:
        mono = block.mean(axis=1, dtype=np.float32) if block.ndim == 2 else block.astype(np.float32)
        if self.stream is None:
            return np.ascontiguousarray(mono)
        return self.stream.resample_chunk(mono, last=last)


def _from_array(audio: np.ndarray | torch.Tensor, sample_rate: int, source_rate: int,
                max_seconds: float | None) -> np.ndarray:
    array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    name = describe(array)
    if array.ndim not in (1, 2):
        raise InputError(f"{name}: expected samples [N] or [channels, N]")
    if not array.size:
        raise InputError(f"{name}: no audio (zero samples)")
    if np.issubdtype(array.dtype, np.signedinteger):  # PCM: full scale is 2 ** (bits - 1), as soundfile reads it
        array = array / float(-np.iinfo(array.dtype).min)
    elif not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{name}: samples must be floats or signed integers, not {array.dtype}")
    if array.ndim == 2:
        array = array.mean(axis=0)
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise InputError(f"{name}: holds NaN or infinite samples")
    if max_seconds is not None and len(array) / source_rate > max_seconds:
        raise InputError(f"{name}: longer than the limit of {max_seconds:g} s")
    if source_rate != sample_rate:
        import soxr

        array = soxr.resample(array, source_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(array)


# Whisper's features


N_FFT, HOP_LENGTH, CHUNK_SECONDS = 400, 160, 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples: one window of the model
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 frames


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-scale, area-normalised triangular mel filters [n_mels, n_fft // 2 + 1], as librosa makes them."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        linear = 3.0 * hz / 200.0
        return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4), linear)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)

    bins = n_fft // 2 + 1
    fft_freqs = np.linspace(0, sample_rate // 2, bins)
    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sample_rate / 2)), n_mels + 2))
    slopes = edges[None, :] - fft_freqs[:, None]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up)).astype(np.float32)
    filters *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :].astype(np.float32)
    return torch.from_numpy(filters.T.copy())


def pad_or_trim(waveform: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pad or cut the last dimension to `length` samples."""
    if waveform.shape[-1] >= length:
        return waveform[..., :length]
    return torch.nn.functional.pad(waveform, (0, length - waveform.shape[-1]))


def log_mel_spectrogram(waveform: np.ndarray | torch.Tensor, n_mels: int = 80,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Whisper's log-mel features [n_mels, frames] (or [B, n_mels, frames]) of 16 kHz samples [N] (or [B, N]).

    Power spectrum of 25 ms Hann windows every 10 ms, mel filters, log10 floored at 8 decades below the
    loudest frame, scaled to about [-1, 1]. The frames of a 30-second window are `N_FRAMES` (pad the
    samples to `N_SAMPLES` first).
    """
    samples = torch.as_tensor(waveform, dtype=torch.float32, device=device)
    window = torch.hann_window(N_FFT, device=device)
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = mel_filters(n_mels).to(device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


def find_audio(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files named, and audio or video files under directories named (recursively, sorted)."""
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*")
                          if p.suffix.lower() in AUDIO_SUFFIXES | VIDEO_SUFFIXES and p.is_file())
        else:
            out.append(path)
    return out

