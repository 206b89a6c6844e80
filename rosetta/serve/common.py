"""What the server's parts share: its settings, the services routes reach through `services(request)`, and
errors as JSON `{"error": {"code", "message"}}`.

Errors have a 4xx status for anything a client can cause: a missing or wrong API key (401), a body over
the size limit (413, checked on Content-Length and again while the body streams in), too many inputs or
pixels or seconds of sound (413), an image, sound or video that does not decode, one the model has no
tower for, or a malformed request (422), an unsupported content type (415), an overloaded model queue (503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from rosetta.errors import InputError
from rosetta.serve.batching import CANNOT, Overloaded


@dataclass
class Settings:
    model_name: str | None = None  # what stores know the model by (default: rosetta.store.index.model_name)
    api_key: str | None = None  # None: no key needed
    max_batch: int = 32  # inputs per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    batching: bool = True  # False: every request's inputs run alone (the benchmark's baseline)
    cors_origins: Sequence[str] = ()  # empty: no CORS headers, browsers allow same-origin only
    cache_size: int = 10_000  # embeddings kept in the LRU cache; 0 turns it off
    max_body_bytes: int = 32 * 1024 * 1024
    max_items: int = 64  # texts, images, labels or files in one request
    max_text_chars: int = 10_000
    max_pixels: int = 32 * 1024 * 1024  # per image, checked before decoding (decompression bombs)
    max_k: int = 1000
    max_queue: int = 4096  # inputs waiting for the model before requests get 503
    thumbnail_size: int = 256
    max_new_tokens: int = 4096  # the most tokens one completion may ask for
    max_sequences: int = 8  # sequences a language model decodes together (continuous batching)
    compile: bool = False  # decode steps (language models, speech) and image batches through torch.compile
    max_audio_seconds: float = 2 * 3600.0  # the longest recording (sound or video) one request may send
    allow_remote_images: bool = False  # fetch http(s) image URLs named in requests (off: no request forgery)


@dataclass
class Services:
    """What the routes share: reach it with `services(request)`."""

    settings: Settings
    model: Any  # the model object itself: read-only use outside the model thread
    metrics: Any  # rosetta.serve.metrics.Metrics
    batched: Any = None  # rosetta.serve.batching.BatchedModel, for a model that embeds
    batcher: Any = None  # its MicroBatcher
    cache: Any = None  # its EmbeddingCache
    generator: Any = None  # rosetta.serve.generation.TextGenerator, for a model that generates text
    store: Any = None
    store_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # writes to the store, one at a time


def services(request: Request) -> Services:
    return request.app.state.rosetta


# Errors


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable machine-readable name, e.g. invalid_image, too_many_items")
    message: str = Field(description="what was wrong, naming the input")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.code = code


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}
_DESCRIPTIONS = {400: "a body the server could not parse", 401: "missing or wrong API key", 404: "no such item",
                 413: "body, inputs or pixels over the limits",
                 415: "unsupported content type", 422: "malformed request or undecodable input",
                 502: "a hosted model's vendor failed (after its retries) or refused the server's key",
                 503: "the model queue is full, the server is stopping, or no store is configured"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, all with the same body."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS.get(s, _CODES.get(s, "error"))} for s in statuses}


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def input_error(e: InputError, modality: str = "image") -> ApiError:
    """A bad input of `modality`: 413 for an image over the pixel limit or a sound or video over the length
    limit, 422 for anything else (unsupported_input for a modality the model has no tower for)."""
    message = str(e)
    if "decompression bomb" in message or "exceeds the limit" in message:
        return ApiError(413, "image_too_large", message)
    if "longer than the limit" in message:
        return ApiError(413, f"{modality}_too_long", message)
    if message in CANNOT.values():
        return ApiError(422, "unsupported_input", message)
    if modality != "image":
        return ApiError(422, f"invalid_{modality}", message)
    return ApiError(422, "invalid_image" if "image" in message else "invalid_input", message)


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) + ("; ..." if len(errors) > 5 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = getattr(e, "code", None) or _CODES.get(e.status_code, "error")
        return error_json(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_json(422, "invalid_request", validation_message(e.errors()))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded) -> JSONResponse:
        return error_json(503, "overloaded", str(e), {"Retry-After": "1"})

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError) -> JSONResponse:
        error = input_error(e)
        return error_json(error.status_code, error.code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # a bug: still JSON, still the same shape
        return error_json(500, "internal", f"internal error ({type(e).__name__}); see the server log")
