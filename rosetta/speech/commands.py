"""`rosetta transcribe`: speech in audio and video files to text and subtitles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rosetta.cli import add_compile_arg, add_model_args, fail, model_from_args
from rosetta.errors import RosettaError
from rosetta.speech.formats import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transcribe", help="transcribe speech in audio or video files (text, SRT, VTT, JSON, TSV)",
        description="Transcribe audio and video files (directories are searched recursively) with a Whisper model. "
                    "Writes DIR/NAME.FORMAT for each input with --out, else prints the transcripts. Long files are "
                    "decoded in 30-second windows; --vad skips the silence between speech.")
    p.add_argument("inputs", nargs="+", metavar="FILE", help="audio or video files, or directories of them")
    p.add_argument("--format", "-f", default="txt", choices=[*FORMATS, "all"], help="output format (default: txt)")
    p.add_argument("--out", "-o", metavar="DIR", help="write one file per input (and format) here")
    p.add_argument("--language", help="the spoken language's code (en, de...); default: detected (multilingual)")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                   help="translate: write English whatever is spoken (multilingual models)")
    p.add_argument("--beam-size", type=int, default=1, help="1 is greedy (default: 1)")
    p.add_argument("--word-timestamps", action="store_true", help="time every word (JSON shows them)")
    p.add_argument("--vad", action="store_true", help="decode only where voice activity is detected")
    add_compile_arg(p)
    p.add_argument("--initial-prompt", metavar="TEXT", help="text the first window continues (names, spelling)")
    p.add_argument("--no-condition-on-previous-text", dest="condition", action="store_false",
                   help="decode each window without the text before it (less drift, less context)")
    p.add_argument("--temperature", type=float, nargs="+", metavar="T",
                   help="temperatures tried in turn when a window's text is repetitive or unlikely "
                        "(default: 0 0.2 0.4 0.6 0.8 1)")
    add_model_args(p, purpose="a Whisper model: whisper-tiny.en, openai/whisper-small, a faster-whisper directory")
    p.set_defaults(run=cmd_transcribe)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from rosetta.modalities.audio import find_audio
    from rosetta.speech.formats import render
    from rosetta.speech.transcribe import transcribe_many

    if args.beam_size < 1:
        raise RosettaError("--beam-size must be at least 1")
    model = model_from_args(args)
    if not callable(getattr(model, "transcribe", None)):
        raise RosettaError(f"--model {args.model}: a {type(model).__name__}, which does not transcribe speech "
                           "(use a Whisper model: whisper-tiny.en, openai/whisper-small, ...)")
    files = find_audio(args.inputs)
    if not files:
        raise RosettaError("no audio or video files found in the inputs")
    options = dict(language=args.language, task=args.task, beam_size=args.beam_size,
                   word_timestamps=args.word_timestamps, initial_prompt=args.initial_prompt,
                   condition_on_previous_text=args.condition)
    if args.temperature:
        options["temperatures"] = tuple(args.temperature)
    failures = []

    def report(audio, error: Exception) -> None:
        fail(str(error) if str(audio) in str(error) else f"{audio}: {error}")
        failures.append(audio)

    results = transcribe_many(model, files, batch_size=args.batch_size, vad=args.vad, compile=args.compile,
                              on_error=report, progress=sys.stderr.isatty() or None, **options)
    formats = FORMATS if args.format == "all" else (args.format,)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    from rosetta.files import atomic_write

    for path, result in zip(files, results):
        if result is None:
            continue
        for format in formats:
            text = render(result, format)
            if out is None:
                sys.stdout.write(text if len(files) == 1 else f"==> {path} <==\n{text}")
            else:
                atomic_write(out / f"{path.stem}.{format}", lambda f, text=text: f.write(text.encode("utf-8")))
        sys.stdout.flush()
    if out is not None:
        done = len(files) - len(failures)
        print(f"wrote {done} transcript(s) to {out}", file=sys.stderr)
    return 1 if failures else 0
