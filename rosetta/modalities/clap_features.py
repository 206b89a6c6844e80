"""CLAP's audio features, as transformers' ClapFeatureExtractor computes them, in torch.

    48 kHz samples
      ├─ at most 10 s: repeated and/or zero-padded to 10 s ("repeatpad", "repeat", "pad")
      └─ longer: "rand_trunc" keeps a random 10-s crop; "fusion" keeps the whole clip
    ─▶ power spectrum of 1024-sample Hann windows every 480 samples (centred, reflect-padded)
    ─▶ mel filters ─▶ decibels (10 log10, floored at -100 dB)
    ─▶ "rand_trunc": [1, 1001, n_mels], with librosa's filters (Slaney scale, area-normalised)
       "fusion":     [4, 1001, n_mels], with torchaudio's filters (HTK scale, peak 1): a clip longer than 10 s
                     gives itself squeezed to 1001 frames and three random 10-s crops of its front, middle and
                     back thirds; a shorter one four copies of its padded self

The random draws are ClapFeatureExtractor's own calls (`choice`, `randint`) on a numpy `RandomState` the caller
passes, so a seeded state reproduces transformers' features exactly: seeding numpy's global state with the same
seed before calling ClapFeatureExtractor makes the same draws.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TRUNCATIONS = ("fusion", "rand_trunc")
PADDINGS = ("repeatpad", "repeat", "pad")
_MIN_POWER = 1e-10  # -100 dB


@dataclass(frozen=True)
class ClapFeatureConfig:
    """ClapFeatureExtractor's settings (preprocessor_config.json), under the names of its arguments' meaning."""

    sampling_rate: int = 48_000
    n_mels: int = 64  # feature_size
    n_fft: int = 1024  # fft_window_size
    hop_length: int = 480
    max_seconds: int = 10  # max_length_s
    f_min: float = 50.0  # frequency_min
    f_max: float = 14_000.0  # frequency_max
    truncation: str = "fusion"  # for clips longer than max_seconds: "fusion" or "rand_trunc"
    padding: str = "repeatpad"  # for shorter clips: "repeatpad", "repeat" or "pad"

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {self.truncation!r} (expected one of {', '.join(TRUNCATIONS)})")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r} (expected one of {', '.join(PADDINGS)})")

    @property
    def max_samples(self) -> int:
        return self.max_seconds * self.sampling_rate

    @property
    def frames(self) -> int:
        """Frames of a clip of max_seconds (the centred STFT adds one)."""
        return self.max_samples // self.hop_length + 1


def _hz_to_mel(hz: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    linear = 3.0 * hz / 200.0  # Slaney: linear below 1 kHz, logarithmic above
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4), linear)


def _mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int, sampling_rate: int, f_min: float, f_max: float,
                scale: str) -> torch.Tensor:
    """Triangular mel filters [n_fft // 2 + 1, n_mels] in float64: "htk" as torchaudio makes them (peak 1),
    "slaney" as librosa does (Slaney's scale, each filter divided by its width)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(f_min), scale), _hz_to_mel(np.array(f_max), scale),
                                   n_mels + 2), scale)
    bins = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    widths = np.diff(edges)
    filters = np.maximum(0.0, np.minimum(-slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]))
    if scale == "slaney":
        filters *= 2.0 / (edges[2:] - edges[:-2])[None, :]
    return torch.from_numpy(filters)


class ClapFeatureExtractor:
    """Waveforms (mono, at `config.sampling_rate`) to CLAP's `input_features` [N, 1 or 4, frames, n_mels] and
    `is_longer` [N], exactly as transformers' ClapFeatureExtractor batches them."""

    def __init__(self, config: ClapFeatureConfig):
        self.config = config
        c = config
        # Fusion models were trained on torchaudio's filters, the others on librosa's (transformers keeps both).
        scale = "htk" if c.truncation == "fusion" else "slaney"
        self.filters = mel_filters(c.n_mels, c.n_fft, c.sampling_rate, c.f_min, c.f_max, scale)
        # On the CPU, where the samples are, even inside a model built on the meta device (rosetta.load).
        self.window = torch.hann_window(c.n_fft, periodic=True, dtype=torch.float64, device="cpu")

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Decibels of the mel power spectrum [frames, n_mels] (float32) of float64 samples [N]."""
        c = self.config
        stft = torch.stft(waveform, c.n_fft, c.hop_length, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)
        power = torch.view_as_real(stft).square().sum(-1)  # |X|², without the square root of abs()
        mel = (self.filters.T @ power).clamp_(min=_MIN_POWER)
        return (10.0 * mel.log10_()).T.float()

    def pad(self, waveform: torch.Tensor) -> torch.Tensor:
        """A clip of at most max_seconds brought to max_seconds by the config's padding."""
        length, target = waveform.shape[0], self.config.max_samples
        if length < target and self.config.padding != "pad":
            repeats = target // length
            if self.config.padding == "repeat":  # repeated past the end, then cut
                return waveform.repeat(repeats + 1)[:target]
            waveform = waveform.repeat(repeats)  # "repeatpad": whole repetitions, then silence
        return F.pad(waveform, (0, target - waveform.shape[0]))

    def clip(self, waveform: np.ndarray | torch.Tensor, rng: np.random.RandomState) -> tuple[torch.Tensor, bool]:
        """One clip's features [1 or 4, frames, n_mels] and whether it is longer than max_seconds (for fusion)."""
        c = self.config
        samples = torch.as_tensor(np.asarray(waveform), dtype=torch.float64)
        if samples.ndim != 1 or not samples.shape[0]:
            raise ValueError(f"expected mono samples [N > 0], got shape {tuple(samples.shape)}")
        if samples.shape[0] <= c.max_samples:
            mel = self.log_mel(self.pad(samples))
            return (mel.expand(4, -1, -1) if c.truncation == "fusion" else mel[None]), False
        if c.truncation == "rand_trunc":
            start = rng.randint(0, samples.shape[0] - c.max_samples + 1)
            return self.log_mel(samples[start : start + c.max_samples])[None], True
        mel = self.log_mel(samples)
        if mel.shape[0] == c.frames:  # longer by less than a hop: the whole clip fits the frames
            return mel.expand(4, -1, -1), False
        return self._fuse(mel, rng), True

    def _fuse(self, mel: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        """The whole spectrogram squeezed to `frames` (bilinear), then a random crop from each third of it."""
        frames = self.config.frames
        # The crops' starting frames, split in three ranges; too short a clip crops its middle and back at 0.
        ranges = np.array_split(list(range(0, mel.shape[0] - frames + 1)), 3)
        starts = [rng.choice(r if len(r) else [0]) for r in ranges]
        squeezed = F.interpolate(mel[None, None], size=[frames, mel.shape[1]], mode="bilinear", align_corners=False)
        return torch.stack([squeezed[0, 0], *(mel[s : s + frames] for s in starts)])

    def __call__(self, waveforms: Sequence[np.ndarray | torch.Tensor],
                 rng: np.random.RandomState | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_features` [N, 1 or 4, frames, n_mels] and `is_longer` [N] of a batch of clips.

        As in transformers (and LAION's HTSAT before it), a fusion batch without a long clip has one clip,
        chosen at random, marked longer: the fusion branch always runs. A batch of one is therefore always
        marked; embed it clip by clip for embeddings that do not depend on their batch.
        `rng`: a RandomState or a seed for the random crops and that choice (None: unseeded).
        """
        if not len(waveforms):
            raise ValueError("no clips")
        if not isinstance(rng, np.random.RandomState):
            rng = np.random.RandomState(rng)
        features, longer = zip(*(self.clip(w, rng) for w in waveforms))
        is_longer = torch.tensor(longer)
        if self.config.truncation == "fusion" and not is_longer.any():
            is_longer[rng.randint(0, len(waveforms))] = True
        return torch.stack(features), is_longer
