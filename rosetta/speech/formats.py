"""Transcripts as people use them: plain text, SRT and WebVTT subtitles, TSV, JSON (segments with words)."""

from __future__ import annotations

import dataclasses
import json

from rosetta.speech.transcribe import Transcription, format_timestamp

FORMATS = ("txt", "srt", "vtt", "json", "tsv")


def render(transcription: Transcription, format: str) -> str:
    segments = transcription.segments
    if format == "txt":
        return "".join(s.text.strip() + "\n" for s in segments)
    if format == "srt":
        return "\n".join(
            f"{i}\n{format_timestamp(s.start, True, ',')} --> {format_timestamp(s.end, True, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(segments, 1))
    if format == "vtt":
        return "WEBVTT\n\n" + "\n".join(
            f"{format_timestamp(s.start)} --> {format_timestamp(s.end)}\n{s.text.strip()}\n" for s in segments)
    if format == "tsv":  # milliseconds, as openai/whisper writes them
        rows = [f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text.strip().replace(chr(9), ' ')}"
                for s in segments]
        return "start\tend\ttext\n" + "".join(row + "\n" for row in rows)
    if format == "json":
        return json.dumps(as_dict(transcription), ensure_ascii=False, indent=2) + "\n"
    raise ValueError(f"unknown format {format!r} (expected one of {', '.join(FORMATS)})")


def as_dict(transcription: Transcription) -> dict:
    return {"text": transcription.text, "language": transcription.language,
            "language_probability": transcription.language_probability, "duration": transcription.duration,
            "segments": [dataclasses.asdict(s) for s in transcription.segments]}
