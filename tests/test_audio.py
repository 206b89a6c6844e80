"""Audio: decoding real files of every container (WAV, FLAC, Ogg, MP3, M4A, Opus, the audio of a video) to mono
float32 at 16 kHz, mono mixdown, band-limited resampling, arrays, bad input, streaming long files in blocks,
Whisper's log-mel features against transformers', and finding audio files in a directory tree.

Every file is written here, with soundfile or PyAV (FFmpeg), from a tone or seeded noise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from rosetta.errors import InputError
from rosetta.modalities.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioSpans,
    audio_blocks,
    find_audio,
    load_audio,
    log_mel_spectrogram,
    pad_or_trim,
)

TONE_HZ, TONE_SECONDS, TONE_AMPLITUDE = 440.0, 1.5, 0.5
# Lossy codecs pad the start and end of a stream (AAC primes 1024 samples and rounds up to whole frames).
CODEC_PADDING_SECONDS = 0.03


# Signals and files.


def _tone(hz: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """A sine of TONE_AMPLITUDE, [channels, samples] float32, the same in every channel."""
    t = np.arange(round(seconds * rate)) / rate
    wave = (TONE_AMPLITUDE * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.tile(wave, (channels, 1))


def _noise(seconds: float, rate: int, scale: float = 0.05) -> np.ndarray:
    """Quiet seeded white noise, [samples] float32."""
    return (scale * np.random.default_rng(0).standard_normal(round(seconds * rate))).astype(np.float32)


def _write_soundfile(path: Path, samples: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    """Write [samples] or [channels, samples] with libsndfile; the format follows the suffix."""
    sf.write(path, samples.T, rate, subtype=subtype)
    return path


def _write_av(path: Path, samples: np.ndarray | None, rate: int = 48_000, codec: str = "aac",
              video_frames: int = 0) -> Path:
    """Encode [channels, samples] with FFmpeg (the container follows the suffix), with `video_frames` frames of a
    small video stream at 10 fps; `samples=None` writes the video alone."""
    with av.open(str(path), "w") as container:  # every stream is added before the first packet is muxed
        video = container.add_stream("mpeg4", rate=10, width=32, height=32, pix_fmt="yuv420p") if video_frames else None
        if samples is not None:
            layout = {1: "mono", 2: "stereo"}[len(samples)]
            audio = container.add_stream(codec, rate=rate, layout=layout)
            step = audio.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], step):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + step]),
                                                   format="fltp", layout=layout)
                frame.sample_rate, frame.pts = rate, start
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
        for i in range(video_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * i, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        if video is not None:
            container.mux(video.encode(None))
    return path


def _dominant_hz(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


def _rms(waveform: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))


def _db(ratio: float) -> float:
    return 20 * np.log10(ratio)


# Decoding: every container, to mono float32 at 16 kHz.


class Format(NamedTuple):
    filename: str
    write: Callable[[Path, np.ndarray, int], Path]
    rate: int
    channels: int = 1


def _soundfile(subtype: str) -> Callable[[Path, np.ndarray, int], Path]:
    return lambda path, samples, rate: _write_soundfile(path, samples, rate, subtype)


def _ffmpeg(codec: str, video_frames: int = 0) -> Callable[[Path, np.ndarray, int], Path]:
    return lambda path, samples, rate: _write_av(path, samples, rate, codec, video_frames)


FORMATS = {
    "wav-16-bit-mono": Format("tone.wav", _soundfile("PCM_16"), 44_100),
    "wav-16-bit-stereo": Format("tone.wav", _soundfile("PCM_16"), 44_100, channels=2),
    "wav-float-mono": Format("tone.wav", _soundfile("FLOAT"), 48_000),
    "wav-float-stereo": Format("tone.wav", _soundfile("FLOAT"), 48_000, channels=2),
    "flac": Format("tone.flac", _soundfile("PCM_16"), 44_100),
    "ogg-vorbis": Format("tone.ogg", _soundfile("VORBIS"), 44_100),
    "mp3": Format("tone.mp3", _ffmpeg("libmp3lame"), 44_100),
    "m4a-aac": Format("tone.m4a", _ffmpeg("aac"), 48_000),
    "opus-ogg": Format("tone.ogg", _ffmpeg("libopus"), 48_000),
    "opus-webm": Format("tone.webm", _ffmpeg("libopus"), 48_000),
    "mp4-video": Format("clip.mp4", _ffmpeg("aac", video_frames=15), 44_100),
}


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_decodes_to_mono_float32_at_16_khz(tmp_path, fmt):
    path = fmt.write(tmp_path / fmt.filename, _tone(TONE_HZ, TONE_SECONDS, fmt.rate, fmt.channels), fmt.rate)
    waveform = load_audio(path)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(len(waveform) / SAMPLE_RATE - TONE_SECONDS) <= CODEC_PADDING_SECONDS
    assert abs(_dominant_hz(waveform) - TONE_HZ) <= 2
    assert _rms(waveform) == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize("fmt", [FORMATS["wav-16-bit-stereo"], FORMATS["flac"]], ids=["wav", "flac"])
def test_bytes_decode_like_the_path(tmp_path, fmt):
    path = fmt.write(tmp_path / fmt.filename, _tone(TONE_HZ, TONE_SECONDS, fmt.rate, fmt.channels), fmt.rate)
    assert np.array_equal(load_audio(path.read_bytes()), load_audio(path))
    assert np.array_equal(load_audio(str(path)), load_audio(path))


# Mono mixdown.


def _two_tones(rate: int = SAMPLE_RATE) -> np.ndarray:
    """Stereo [2, samples]: 440 Hz on the left, a quieter 1 kHz on the right."""
    return np.concatenate([_tone(440, 2.0, rate), 0.5 * _tone(1000, 2.0, rate)])


@pytest.mark.parametrize(
    "filename, subtype, tolerance",
    [("stereo.wav", "FLOAT", 1e-7), ("stereo.flac", "PCM_24", 1e-6)],
    ids=["wav", "flac"],
)
def test_stereo_is_averaged_to_mono(tmp_path, filename, subtype, tolerance):
    stereo = _two_tones()
    waveform = load_audio(_write_soundfile(tmp_path / filename, stereo, SAMPLE_RATE, subtype))
    np.testing.assert_allclose(waveform, stereo.mean(axis=0), atol=tolerance)


def test_stereo_decoded_by_ffmpeg_is_averaged_like_soundfile(tmp_path):
    stereo = _two_tones()
    path = _write_av(tmp_path / "stereo.mka", stereo, SAMPLE_RATE, codec="pcm_f32le")  # lossless, through PyAV
    np.testing.assert_allclose(load_audio(path), stereo.mean(axis=0), atol=1e-6)


# Resampling: band-limited, to the right length.


@pytest.mark.parametrize("rate, hz", [(8_000, 1_000), (22_050, 3_000), (44_100, 5_000)])
def test_resamples_to_16_khz_with_the_right_length(tmp_path, rate, hz):
    seconds = 2.0
    waveform = load_audio(_write_soundfile(tmp_path / "tone.wav", _tone(hz, seconds, rate), rate, "FLOAT"))
    assert abs(len(waveform) - seconds * SAMPLE_RATE) <= 2
    assert abs(_dominant_hz(waveform) - hz) <= 2
    assert _rms(waveform[100:-100]) == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.02)


def test_resampling_filters_what_16_khz_cannot_hold(tmp_path):
    # 7.5 kHz is under the 8 kHz Nyquist frequency of 16 kHz audio and must survive; 10 kHz is over it and must
    # go rather than fold back to 6 kHz, as plain interpolation would make it.
    below, above = (
        load_audio(_write_soundfile(tmp_path / f"{hz}.wav", _tone(hz, 1.0, 44_100), 44_100, "FLOAT"))[200:-200]
        for hz in (7_500, 10_000)
    )
    assert abs(_dominant_hz(below) - 7_500) <= 2
    assert _db(_rms(below) / (TONE_AMPLITUDE / np.sqrt(2))) > -1
    assert _db(_rms(above) / _rms(below)) < -40


# Arrays.


def test_float_arrays_are_taken_as_samples():
    samples = _noise(1.0, SAMPLE_RATE)
    for array in (samples, samples.astype(np.float64), torch.from_numpy(samples), torch.from_numpy(samples).double()):
        waveform = load_audio(array)
        assert waveform.dtype == np.float32
        assert np.array_equal(waveform, samples)


def test_int16_array_is_scaled_to_unit_range():
    pcm = np.array([0, 8192, -16384, 32767, -32767], np.int16)
    np.testing.assert_allclose(load_audio(pcm), pcm / 32768, atol=1e-4)


def test_int16_array_matches_the_same_samples_in_a_wav(tmp_path):
    pcm = np.array([0, 16384, 32767, -32768], np.int16)
    path = _write_soundfile(tmp_path / "pcm.wav", pcm, SAMPLE_RATE, "PCM_16")
    waveform = load_audio(pcm)
    assert waveform.min() >= -1.0
    assert np.array_equal(waveform, load_audio(path))


def test_int16_tensor_is_scaled_like_the_array():
    pcm = np.array([0, 8192, -16384, 32767], np.int16)
    assert np.array_equal(load_audio(torch.from_numpy(pcm)), load_audio(pcm))


def test_channels_first_array_is_averaged():
    stereo = _two_tones()
    np.testing.assert_allclose(load_audio(stereo), stereo.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(load_audio(torch.from_numpy(stereo)), stereo.mean(axis=0), atol=1e-7)


def test_source_rate_resamples_arrays_like_files(tmp_path):
    samples = _tone(TONE_HZ, 2.0, 44_100)[0]
    waveform = load_audio(samples, source_rate=44_100)
    assert abs(len(waveform) - 2 * SAMPLE_RATE) <= 2
    assert abs(_dominant_hz(waveform) - TONE_HZ) <= 2
    from_file = load_audio(_write_soundfile(tmp_path / "tone.wav", samples, 44_100, "FLOAT"))
    np.testing.assert_allclose(waveform, from_file, atol=1e-5)


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.array([0.0, np.nan, 0.5], np.float32), "holds NaN or infinite samples"),
        (np.array([0.0, np.inf, 0.5]), "holds NaN or infinite samples"),
        (torch.tensor([0.0, -float("inf")]), "holds NaN or infinite samples"),
        (np.zeros(0, np.float32), "no audio"),
        (np.zeros((2, 0), np.float32), "no audio"),
        (np.zeros((0, 5), np.float32), "no audio"),
        (np.zeros((2, 2, 5), np.float32), r"expected samples \[N\] or \[channels, N\]"),
    ],
    ids=["nan", "inf", "tensor-inf", "empty", "empty-stereo", "no-channels", "3-d"],
)
def test_bad_arrays(array, reason):
    with pytest.raises(InputError, match=re.escape(f"<array {tuple(array.shape)}>: ") + reason):
        load_audio(array)


# Bad input: each an InputError naming the input and the reason.


def _raises(source, reason: str, **kwargs) -> None:
    name = str(source) if isinstance(source, Path) else f"<{len(source)} bytes>"
    with pytest.raises(InputError, match=re.escape(f"{name}: ") + reason):
        load_audio(source, **kwargs)


def test_missing_file(tmp_path):
    _raises(tmp_path / "nowhere.wav", "no such file")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples\n" * 50)
    _raises(path, "not an audio or video file")
    _raises(path.read_bytes(), "not an audio or video file")


@pytest.mark.parametrize("filename", ["speech.wav", "speech.flac"])
def test_truncated_file_fails_cleanly_or_decodes_less(tmp_path, filename):
    full = _write_soundfile(tmp_path / filename, _noise(5.0, SAMPLE_RATE), SAMPLE_RATE, "PCM_16")
    data = full.read_bytes()
    truncated = tmp_path / f"truncated-{filename}"
    truncated.write_bytes(data[: len(data) // 2])
    for source in (truncated, truncated.read_bytes()):
        try:
            waveform = load_audio(source)
        except InputError:
            continue
        assert 0 < len(waveform) < len(load_audio(full))


def test_zero_frames(tmp_path):
    _raises(_write_soundfile(tmp_path / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE), "no audio")


def test_video_without_audio_track(tmp_path):
    path = _write_av(tmp_path / "silent-film.mp4", None, video_frames=5)
    _raises(path, "has no audio track")
    _raises(path.read_bytes(), "has no audio track")


def test_longer_than_the_limit(tmp_path):
    samples = _noise(3.0, SAMPLE_RATE)
    path = _write_soundfile(tmp_path / "three-seconds.flac", samples, SAMPLE_RATE)
    _raises(path, "longer than the limit of 2 s", max_seconds=2)
    assert len(load_audio(path, max_seconds=3)) == len(samples)
    with pytest.raises(InputError, match=re.escape("<array (48000,)>: longer than the limit of 2 s")):
        load_audio(samples, max_seconds=2)


# Streaming: long files block by block, the same samples as loading them whole.


def _stream(path: Path, block_seconds: float) -> np.ndarray:
    """All of `audio_blocks(path)`, checking each block's length along the way."""
    blocks = list(audio_blocks(path, block_seconds=block_seconds))
    assert len(blocks) > 1
    assert all(0 < len(block) <= 1.02 * block_seconds * SAMPLE_RATE for block in blocks)
    return np.concatenate(blocks)


def test_streaming_at_16_khz_equals_loading_whole(tmp_path):
    path = _write_soundfile(tmp_path / "three-minutes.flac", _noise(180.0, SAMPLE_RATE), SAMPLE_RATE)
    assert np.array_equal(_stream(path, block_seconds=10.0), load_audio(path))


def test_streaming_resamples_like_loading_whole(tmp_path):
    path = _write_soundfile(tmp_path / "three-minutes.flac", _noise(180.0, 44_100), 44_100)
    streamed, whole = _stream(path, block_seconds=10.0), load_audio(path)
    assert abs(len(streamed) - len(whole)) <= 4
    assert abs(len(whole) - 180 * SAMPLE_RATE) <= 4
    common = min(len(streamed), len(whole))
    np.testing.assert_allclose(streamed[:common], whole[:common], atol=1e-3)


def test_streaming_through_ffmpeg_equals_loading_whole(tmp_path):
    path = _write_av(tmp_path / "forty-seconds.mka", _noise(40.0, SAMPLE_RATE)[None], SAMPLE_RATE, "pcm_f32le")
    streamed = _stream(path, block_seconds=5.0)
    assert np.array_equal(streamed, load_audio(path))
    assert len(streamed) == 40 * SAMPLE_RATE


def test_spans_read_in_order_are_the_slices_of_the_whole(tmp_path):
    """Spans across, inside and past the ends of blocks of a tenth of a second, from a file and from the audio
    track of a video: each the slice of the waveform loaded whole; a span before an earlier start is refused."""
    wav = _write_soundfile(tmp_path / "noise.wav", _noise(1.0, SAMPLE_RATE), SAMPLE_RATE, "FLOAT")
    film = _write_av(tmp_path / "film.mp4", _noise(1.0, SAMPLE_RATE)[None], SAMPLE_RATE, video_frames=10)
    bounds = [(0, 100), (50, 2_000), (2_000, 2_000), (3_000, 9_000), (9_000, 15_000), (15_500, 40_000),
              (40_000, 41_000)]
    for source in (wav, film, film.read_bytes()):
        whole = load_audio(source)
        spans = AudioSpans(source, SAMPLE_RATE, block_seconds=0.1)
        for start, end in bounds:
            assert np.array_equal(spans(start, end), whole[start:end]), (source, start, end)
        with pytest.raises(ValueError, match="before an earlier span"):
            spans(0, 10)
    with pytest.raises(InputError, match="has no audio track"):
        AudioSpans(_write_av(tmp_path / "silent.mp4", None, video_frames=5))


# Whisper's log-mel features, against transformers'.


def _speech(tmp_path: Path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True)
    return load_audio(path)


SIGNALS = {
    "speech": _speech,
    "white-noise": lambda tmp_path: _noise(10.0, SAMPLE_RATE, scale=0.1),
    "silence": lambda tmp_path: np.zeros(5 * SAMPLE_RATE, np.float32),
    "shorter-than-30-s": lambda tmp_path: _tone(TONE_HZ, 3.0, SAMPLE_RATE)[0],
    "longer-than-30-s": lambda tmp_path: np.concatenate(
        [_noise(20.0, SAMPLE_RATE), _tone(TONE_HZ, 25.0, SAMPLE_RATE)[0]]
    ),
}


def _features(waveform: np.ndarray, n_mels: int) -> np.ndarray:
    return log_mel_spectrogram(pad_or_trim(torch.from_numpy(waveform)), n_mels).numpy()


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers(tmp_path, signal, n_mels):
    transformers = pytest.importorskip("transformers")
    waveform = SIGNALS[signal](tmp_path)
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    # transformers pads to 30 s and cuts what is longer, as pad_or_trim does.
    theirs = extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    ours = _features(waveform, n_mels)
    assert ours.shape == theirs.shape == (n_mels, N_FRAMES)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_of_a_batch_equals_each_row(n_mels):
    rows = [SIGNALS[name](None) for name in ("white-noise", "silence", "shorter-than-30-s")]
    batch = torch.stack([pad_or_trim(torch.from_numpy(row)) for row in rows])
    assert batch.shape == (len(rows), N_SAMPLES)
    features = log_mel_spectrogram(batch, n_mels)
    assert features.shape == (len(rows), n_mels, N_FRAMES)
    for row, row_features in zip(rows, features):
        np.testing.assert_allclose(row_features.numpy(), _features(row, n_mels), atol=1e-6)


# Finding files.


def _touch(root: Path, *names: str) -> list[Path]:
    paths = [root / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return paths


def test_find_audio_recurses_sorted_and_keeps_named_files(tmp_path):
    media = _touch(tmp_path / "media", "b.wav", "a.MP3", "talks/c.mp4", "talks/2024/d.webm", "talks/2024/e.flac")
    _touch(tmp_path / "media", "notes.txt", "talks/cover.png")
    named = _touch(tmp_path, "named.txt")[0]
    assert find_audio([tmp_path / "media", named]) == sorted(media) + [named]
    assert find_audio([str(named)]) == [named]


def test_find_audio_skips_directories_named_like_audio(tmp_path):
    (tmp_path / "album.flac").mkdir()
    tracks = _touch(tmp_path, "album.flac/01.flac", "album.flac/02.flac")
    assert find_audio([tmp_path]) == tracks
