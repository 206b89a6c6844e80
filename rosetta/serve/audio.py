"""OpenAI's audio endpoints for a Whisper model: `POST /v1/audio/transcriptions` and `/v1/audio/translations`,
multipart forms as OpenAI takes them (`file`, `model`, `language`, `prompt`, `response_format`, `temperature`,
`timestamp_granularities[]`), so that the `openai` SDK works against the server.

Transcriptions run one at a time on a worker thread of their own (a recording keeps the cores busy); the
upload is limited by the body limit and its length by `max_audio_seconds`.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from rosetta.errors import InputError
from rosetta.serve.common import ApiError, error_responses, services

audio = APIRouter(prefix="/v1/audio", tags=["speech"])
_worker = ThreadPoolExecutor(1, thread_name_prefix="rosetta-transcribe")
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


async def _run(request: Request, upload: UploadFile, task: str, language: str | None, prompt: str | None,
               response_format: str, temperature: float, granularities: list[str]):
    svc = services(request)
    if response_format not in FORMATS:
        raise ApiError(422, "invalid_request", f"response_format: one of {', '.join(FORMATS)}")
    if not 0 <= temperature <= 1:
        raise ApiError(422, "invalid_request", "temperature: between 0 and 1")
    unknown = set(granularities) - {"segment", "word"}
    if unknown:
        raise ApiError(422, "invalid_request", f"timestamp_granularities: unknown {sorted(unknown)}")
    data = await upload.read()
    if not data:
        raise ApiError(422, "invalid_audio", "file: empty upload")
    name = upload.filename or "upload"
    options: dict[str, Any] = {"task": task, "language": language or None, "initial_prompt": prompt or None,
                               "word_timestamps": "word" in granularities}
    if temperature > 0:  # OpenAI's temperature: sampling from the start, with fallback above it
        options["temperatures"] = tuple(t for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if t >= temperature)
    limit = svc.settings.max_audio_seconds

    def work():
        from rosetta.modalities.audio import load_audio

        waveform = load_audio(data, max_seconds=limit)  # decoded once here: the limit is checked first
        return svc.model.transcribe(waveform, compile=svc.settings.compile, **options)

    try:
        result = await asyncio.get_running_loop().run_in_executor(_worker, work)
    except InputError as e:
        reason = str(e).split(": ", 1)[-1]
        if "longer than the limit" in reason:
            raise ApiError(413, "audio_too_long", f"{name}: {reason}") from None
        raise ApiError(422, "invalid_audio", f"{name}: {reason}") from None
    return _respond(result, response_format, task, "word" in granularities)


def _respond(result, response_format: str, task: str, words: bool):
    from rosetta.models.asr import LANGUAGES
    from rosetta.speech.formats import render

    if response_format in ("text", "srt", "vtt"):
        text = result.text + "\n" if response_format == "text" else render(result, response_format)
        return PlainTextResponse(text)
    if response_format == "json":
        return JSONResponse({"text": result.text})
    body: dict[str, Any] = {
        "task": task, "language": LANGUAGES.get(result.language or "en", result.language), "duration": result.duration,
        "text": result.text,
        "segments": [{"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens,
                      "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                      "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                     for s in result.segments],
    }
    if words:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end}
                         for s in result.segments for w in (s.words or [])]
    return JSONResponse(body)


_ERRORS = error_responses(400, 413, 415, 422)


@audio.post("/transcriptions", summary="what is said in an audio file (OpenAI's transcriptions)", responses=_ERRORS)
async def transcriptions(
    request: Request,
    file: Annotated[UploadFile, File(description="the audio (or video) file")],
    model: Annotated[str | None, Form(description="accepted and ignored: the server runs one model")] = None,
    language: Annotated[str | None, Form(description="the spoken language's code; default: detected")] = None,
    prompt: Annotated[str | None, Form(description="text the transcript continues (names, spelling)")] = None,
    response_format: Annotated[str, Form(description="json, text, srt, verbose_json or vtt")] = "json",
    temperature: Annotated[float, Form()] = 0.0,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
):
    return await _run(request, file, "transcribe", language, prompt, response_format, temperature,
                      timestamp_granularities or ["segment"])


@audio.post("/translations", summary="what is said, in English (OpenAI's translations)", responses=_ERRORS)
async def translations(
    request: Request,
    file: Annotated[UploadFile, File(description="the audio (or video) file")],
    model: Annotated[str | None, Form(description="accepted and ignored: the server runs one model")] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[str, Form(description="json, text, srt, verbose_json or vtt")] = "json",
    temperature: Annotated[float, Form()] = 0.0,
):
    if not services(request).model.tokens.languages:
        raise ApiError(422, "unsupported", "this model is English-only: it cannot translate")
    return await _run(request, file, "translate", None, prompt, response_format, temperature, ["segment"])
