"""The HTTP API: `create_app(model, store, settings)` builds a FastAPI app around one model.

Routes live in routers (`ROUTERS`), each with what it needs of the model: "embed" (the embedding routes for
texts, images, sounds and videos, through the `BatchedModel`: embedding cache, then the micro-batcher's single
model thread), "generate" (OpenAI's text endpoints, through the `TextGenerator`'s continuous batching) or
"see" (captions, answers, extraction); chat completions and the chat page need "generate" or "see". A model
gets the routers of what it can do; a new task adds a router and appends it. Routes reach the model, the
store and the settings through `services(request)`; errors are JSON with a 4xx status (see
`rosetta.serve.common`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import mimetypes
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rosetta.errors import InputError, RosettaError
from rosetta.models.compiled import compile_image_tower
from rosetta.models.io import release_openmp_threads
from rosetta.serve.audio import audio
from rosetta.serve.auth import require_api_key
from rosetta.serve.batching import BATCH_LIMITS, BatchedModel, MicroBatcher, embedded_modalities, model_runners
from rosetta.serve.cache import EmbeddingCache
from rosetta.serve.common import (
    ApiError,
    Services,
    Settings,
    error_json,
    error_responses,
    input_error,
    install_error_handlers,
    services,
    validation_message,
)
from rosetta.serve.metrics import Metrics, MetricsMiddleware
from rosetta.serve.openai import chat, completions
from rosetta.serve.vision import vision

STATIC = Path(__file__).parent / "static"


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else as soon as the stream passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_json(413, "body_too_large", f"request body over the limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_json(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to the aborted body is replaced by ours
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# Request bodies


class EmbedTexts(BaseModel):
    texts: list[str] = Field(min_length=1, description="strings to embed")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    text_embeddings: list[list[float]] = Field(description="one L2-normalised vector per text, in order")
    image_embeddings: list[list[float]] = Field(description="one L2-normalised vector per image, in upload order")
    audio_embeddings: list[list[float]] = Field(
        [], description="one L2-normalised vector per sound, in upload order (a model with an audio tower)")
    video_embeddings: list[list[float]] = Field([], description="one L2-normalised vector per video, in upload order")


class ClassifyResponse(BaseModel):
    label: str
    score: float
    probs: dict[str, float]


class SearchQuery(BaseModel):
    text: str | None = Field(None, description="a text query")
    k: int = Field(10, ge=1, description="number of hits (at most the server's max_k)")
    where: str | None = Field(None, description="a metadata filter, e.g. \"width > 512 and format = 'jpeg'\"")
    weights: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="[text weight, image weight] when both a text and an image (sound, video) are given "
                    "(default equal)")


class SearchHit(BaseModel):
    id: str
    path: str | None = None
    score: float
    metadata: dict[str, Any]
    thumbnail: str | None = Field(None, description="URL of a thumbnail, for stored images")
    media: str | None = Field(None, description="URL of the stored file, for sounds and videos")
    start: float | None = Field(None, description="a sound or video: where its best-matching window starts (s)")
    end: float | None = Field(None, description="and where it ends (s; null: the end of the file)")


class SearchResponse(BaseModel):
    hits: list[SearchHit]


class IndexedItem(BaseModel):
    id: str
    path: str
    filename: str


class IndexResponse(BaseModel):
    indexed: list[IndexedItem]
    count: int = Field(description="items in the store afterwards")


class Health(BaseModel):
    status: str


class Info(BaseModel):
    model: str
    capabilities: list[str] = Field(description='"embed" (texts and images, sounds or videos), "generate" (text), '
                                                '"see" (images into text), "transcribe" (speech)')
    modalities: list[str] = Field(description='what a model that embeds takes: "text", "image", "audio", "video"')
    dim: int | None = Field(description="the embedding dimension, for a model that embeds")
    context_length: int | None = Field(description="tokens of context, for a model that generates")
    store: dict[str, Any] | None
    batching: dict[str, Any]
    limits: dict[str, int]


def _multipart_schema(properties: dict[str, Any], any_of: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if any_of:
        schema["anyOf"] = any_of
    return schema


_BINARY = {"type": "string", "format": "binary"}
_STRINGS = {"type": "array", "items": {"type": "string"}}


async def _read_body(request: Request, model: type[BaseModel], list_fields: set[str]) -> tuple[Any, dict]:
    """A JSON or multipart body as (validated model, {field: [(filename, bytes)]} of the uploads)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, list[tuple[str, bytes]]] = {}
    if content_type == "application/json" or content_type.endswith("+json"):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(422, "invalid_json", f"request body is not valid JSON ({e})") from None
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        settings = services(request).settings
        try:
            form = await request.form(max_files=settings.max_items, max_fields=settings.max_items * 4 + 16)
        except HTTPException as e:  # Starlette's multipart errors
            if "Too many" in str(e.detail):
                raise ApiError(413, "too_many_items", f"{e.detail} (the limit is per request)") from None
            raise ApiError(422, "invalid_form", f"could not parse the form ({e.detail})") from None
        except Exception as e:
            raise ApiError(422, "invalid_form", f"could not parse the form ({e})") from None
        data = {}
        try:
            for key in form:
                values = form.getlist(key)
                strings = [v for v in values if isinstance(v, str)]
                uploads = [v for v in values if not isinstance(v, str)]
                if strings:
                    data[key] = strings if key in list_fields or len(strings) > 1 else strings[0]
                for upload in uploads:
                    files.setdefault(key, []).append(
                        (_display_name(upload.filename, len(files.get(key, []))), await upload.read()))
        finally:
            await form.close()
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"send application/json or multipart/form-data, not {content_type or 'no content type'}")
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data), files
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e.errors())) from None


async def _read_uploads(uploads: Sequence[UploadFile]) -> tuple[list[bytes], list[str]]:
    blobs, names = [], []
    for i, upload in enumerate(uploads):
        blobs.append(await upload.read())
        names.append(_display_name(upload.filename, i))
    return blobs, names


def _display_name(filename: str | None, index: int) -> str:
    name = Path(filename or "").name
    return name or f"upload {index}"


def _check_count(what: str, n: int, limit: int) -> None:
    if n > limit:
        raise ApiError(413, "too_many_items", f"{n} {what} in one request; the limit is {limit}")


def _check_texts(texts: Sequence[str], limit: int) -> None:
    for i, text in enumerate(texts):
        if len(text) > limit:
            raise ApiError(413, "text_too_long", f"text {i}: {len(text)} characters; the limit is {limit}")


# Routers

system = APIRouter(tags=["system"])
monitoring = APIRouter(tags=["system"])
embedding = APIRouter(prefix="/v1", tags=["embeddings"])
retrieval = APIRouter(prefix="/v1", tags=["search"])
embedding_page = APIRouter()
chat_page = APIRouter()

# Routers by what they need of the model (None: nothing; a tuple: any one of them), and whether they need the
# API key when one is set. A new task appends its router here.
Needs = str | tuple[str, ...] | None
ROUTERS: list[tuple[APIRouter, Needs]] = [
    (embedding, "embed"), (retrieval, "embed"), (chat, ("generate", "see")), (completions, "generate"),
    (vision, "see"), (audio, "transcribe"), (monitoring, None),
]
OPEN_ROUTERS: list[tuple[APIRouter, Needs]] = [
    (system, None), (embedding_page, "embed"), (chat_page, ("generate", "see")),
]


def _served(needs: Needs, can: set[str]) -> bool:
    return needs is None or bool(can & ({needs} if isinstance(needs, str) else set(needs)))


def capabilities(model) -> set[str]:
    """What a model can do, as the routers name it: "embed" (texts, and images or sounds, into one space),
    "generate" (text), "see" (images into text: captions, answers, extraction), "transcribe" (speech)."""
    can = set()
    embeds = embedded_modalities(model)
    if "text" in embeds and embeds & {"image", "audio"}:
        can.add("embed")
    from rosetta.serve.generation import text_model

    decoder = text_model(model)
    if callable(getattr(decoder, "chat_prompt", None)) and callable(getattr(decoder, "new_cache", None)):
        can.add("generate")
    if callable(getattr(model, "caption", None)):
        can.add("see")
    if callable(getattr(model, "transcribe", None)):
        can.add("transcribe")
    return can


@system.get("/healthz", response_model=Health, summary="liveness (never needs the API key)")
async def healthz() -> Health:
    return Health(status="ok")


@embedding_page.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@chat_page.get("/", include_in_schema=False)
async def chat() -> FileResponse:
    return FileResponse(STATIC / "chat.html", media_type="text/html")


@monitoring.get("/v1/info", response_model=Info, summary="the model, the store and the server's limits")
async def info(request: Request) -> Info:
    svc = services(request)
    s = svc.settings
    store = None
    if svc.store is not None:
        store = {"items": await run_in_threadpool(len, svc.store)}
    limits = {"max_body_bytes": s.max_body_bytes, "max_items": s.max_items, "max_text_chars": s.max_text_chars,
              "max_pixels": s.max_pixels, "max_k": s.max_k}
    can = capabilities(svc.model)
    if can & {"generate", "see"}:
        limits["max_new_tokens"] = s.max_new_tokens
    if svc.generator is not None:
        limits["max_sequences"] = s.max_sequences
    return Info(
        model=s.model_name, capabilities=sorted(can),
        modalities=sorted(svc.batched.modalities) if svc.batched is not None else [],
        dim=svc.batched.dim if svc.batched is not None else None,
        context_length=getattr(svc.model, "context_length", None), store=store,
        batching={"enabled": s.batching, "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms},
        limits=limits,
    )


_UPLOADS = {"images": "image", "audio": "audio", "videos": "video"}  # /v1/embed's upload fields and their modality


@embedding.post(
    "/embed", response_model=EmbedResponse, summary="embed texts, images, sounds and videos into the shared space",
    description="JSON `{\"texts\": [...]}`, or multipart with `texts` fields and `images`, `audio` and `videos` "
                "file uploads (sounds need a model with an audio tower).",
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": EmbedTexts.model_json_schema()},
        "multipart/form-data": {"schema": _multipart_schema(
            {"texts": {**_STRINGS, "minItems": 1},
             **{field: {"type": "array", "items": _BINARY, "minItems": 1} for field in _UPLOADS}},
            any_of=[{"required": ["texts"]}, *({"required": [field]} for field in _UPLOADS)])},
    }}},
)
async def embed(request: Request) -> EmbedResponse:
    svc = services(request)
    body, files = await _read_body(request, _EmbedForm, {"texts"})
    texts = body.texts
    uploads = {modality: files.get(field, []) for field, modality in _UPLOADS.items()}
    if not texts and not any(uploads.values()):
        raise ApiError(422, "empty_request", "give at least one text (texts), image (images), sound (audio) or "
                                             "video (videos)")
    _check_count("texts", len(texts), svc.settings.max_items)
    for field, modality in _UPLOADS.items():
        _check_count(field, len(uploads[modality]), svc.settings.max_items)
    _check_texts(texts, svc.settings.max_text_chars)
    svc.metrics.items.labels("/v1/embed", "text").inc(len(texts))
    for modality, items in uploads.items():
        svc.metrics.items.labels("/v1/embed", modality).inc(len(items))
    text_rows, *media_rows = await asyncio.gather(
        svc.batched.aembed_texts(texts) if texts else _none(),
        *(_embed_uploads(svc.batched, modality, items) for modality, items in uploads.items()),
    )
    rows = dict(zip(uploads, media_rows))
    return EmbedResponse(
        model=svc.settings.model_name, dim=svc.batched.dim,
        text_embeddings=text_rows.tolist() if text_rows is not None else [],
        image_embeddings=rows["image"], audio_embeddings=rows["audio"], video_embeddings=rows["video"],
    )


async def _embed_uploads(batched: BatchedModel, modality: str, uploads: list[tuple[str, bytes]]) -> list[list[float]]:
    """The embeddings of one modality's uploads, as lists; a bad upload is a 4xx naming it."""
    if not uploads:
        return []
    names, blobs = [name for name, _ in uploads], [blob for _, blob in uploads]
    embed = {"image": batched.aembed_images, "audio": batched.aembed_audio, "video": batched.aembed_videos}[modality]
    try:
        return (await embed(blobs, names)).tolist()
    except InputError as e:
        raise input_error(e, modality) from None


async def _none() -> None:
    return None


class _EmbedForm(BaseModel):  # the JSON body, or the string fields of the multipart one
    texts: list[str] = []


@embedding.post(
    "/classify", response_model=ClassifyResponse, summary="zero-shot classify one image, sound or video against labels",
    description="One upload: `image`, `audio` or `video`. Labels may be repeated fields or comma-separated. "
                "`templates` is `default`, `imagenet`, or one or more prompts with `{}` for the label (averaged); "
                "without it, images are 'a photo of a {}.' and sounds and videos their labels as they are.",
    responses=error_responses(400, 413, 415, 422, 503),
)
async def classify(
    request: Request,
    labels: Annotated[list[str], Form(description="labels, e.g. ['dog', 'cat'] or ['dog,cat']")],
    image: Annotated[UploadFile | None, File(description="the image to classify")] = None,
    audio: Annotated[UploadFile | None, File(description="or the sound (a model with an audio tower)")] = None,
    video: Annotated[UploadFile | None, File(description="or the video")] = None,
    templates: Annotated[list[str], Form(description="'default', 'imagenet', or prompts with {}")] = [],  # noqa: B006
) -> ClassifyResponse:
    from rosetta.templates import resolve_templates

    svc = services(request)
    given = {modality: upload for modality, upload in (("image", image), ("audio", audio), ("video", video)) if upload}
    if len(given) != 1:
        raise ApiError(422, "invalid_request", "give one upload to classify: image, audio or video"
                       + (f", not {' and '.join(given)}" if given else ""))
    (modality, upload), = given.items()
    names = [label.strip() for field_ in labels for label in field_.split(",") if label.strip()]
    if not names:
        raise ApiError(422, "invalid_request", "labels: give at least one non-empty label")
    names = list(dict.fromkeys(names))  # a label twice would only split its probability
    _check_count("labels", len(names), svc.settings.max_items)
    _check_texts(names, svc.settings.max_text_chars)
    templates = [t for t in templates if t.strip()]
    _check_count("templates", len(templates), svc.settings.max_items)
    try:
        if len(templates) == 1 and "{}" not in templates[0]:
            prompts = resolve_templates(templates[0].strip())
        else:
            prompts = resolve_templates(templates or None, modality)
        texts = [prompt.format(label) for label in names for prompt in prompts]
    except (ValueError, KeyError, IndexError) as e:
        raise ApiError(422, "invalid_templates", f"templates: {e}") from None
    svc.metrics.items.labels("/v1/classify", modality).inc()
    svc.metrics.items.labels("/v1/classify", "text").inc(len(texts))
    blobs, files = await _read_uploads([upload])
    row, text_rows = await asyncio.gather(_embed_uploads(svc.batched, modality, list(zip(files, blobs))),
                                          svc.batched.aembed_texts(texts))
    probs = await run_in_threadpool(_probabilities, svc.model, row, text_rows, len(names), modality)
    best = max(range(len(names)), key=probs.__getitem__)
    return ClassifyResponse(label=names[best], score=probs[best], probs=dict(zip(names, probs)))


def _probabilities(model, row: list[list[float]], text_rows, n_labels: int, modality: str) -> list[float]:
    """Prompt-ensembled label embeddings, then the model's own probabilities (softmax or sigmoid)."""
    import torch
    import torch.nn.functional as F

    per_prompt = torch.from_numpy(text_rows).view(n_labels, -1, text_rows.shape[-1])
    classifier = F.normalize(per_prompt.mean(dim=1), dim=-1).to(model.device)
    embedding = torch.tensor(row, device=model.device)
    with torch.inference_mode():
        if hasattr(model, "probabilities"):
            probs = model.probabilities(embedding, classifier, modality)
        else:  # a model of sounds only (CLAP): the softmax over labels of its logits, as its classify computes
            probs = model.logits(embedding, classifier).softmax(dim=-1)
    return [float(p) for p in probs[0].tolist()]


def _require_store(svc: Services) -> Any:
    if svc.store is None:
        raise ApiError(503, "no_store", "no store configured: start the server with --store DIR")
    return svc.store


_QUERIES = ("image", "audio", "video")  # /v1/search's upload fields: one at most


@retrieval.post(
    "/search", response_model=SearchResponse,
    summary="nearest stored files to a text, an image, a sound or a video (or a text and one of those)",
    description="JSON `{\"text\", \"k\", \"where\", \"weights\"}`, or multipart with the same fields and an "
                "`image`, `audio` or `video` upload; with a text and an upload the query mixes them by `weights`. "
                "A stored sound or video is found by its best-matching window: `start` and `end` say where it is.",
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchQuery.model_json_schema()},
        "multipart/form-data": {"schema": _multipart_schema(
            {"text": {"type": "string"}, **dict.fromkeys(_QUERIES, _BINARY), "k": {"type": "integer", "minimum": 1},
             "where": {"type": "string"},
             "weights": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}},
            any_of=[{"required": ["text"]}, *({"required": [field]} for field in _QUERIES)])},
    }}},
)
async def search_route(request: Request) -> SearchResponse:
    svc = services(request)
    store = _require_store(svc)
    query, files = await _read_body(request, SearchQuery, {"weights"})
    uploads = [(modality, upload) for modality in _QUERIES for upload in files.get(modality, [])]
    _check_count("image, sound or video uploads", len(uploads), 1)
    if query.text is None and not uploads:
        raise ApiError(422, "empty_request", "give a text, an image, a sound or a video")
    if query.text is not None:
        _check_texts([query.text], svc.settings.max_text_chars)
    if query.k > svc.settings.max_k:
        raise ApiError(413, "too_many_items", f"k={query.k}; the limit is {svc.settings.max_k}")
    if query.weights is not None and (any(w != w or w < 0 for w in query.weights) or sum(query.weights) <= 0):
        raise ApiError(422, "invalid_weights", "weights: two non-negative numbers, not both zero")
    media: dict[str, bytes] = {}
    if uploads:
        modality, (name, blob) = uploads[0]
        try:  # refused here, named, before the model thread sees it
            if modality == "image":
                await _check_images(svc, [blob], [name])
            else:
                await run_in_threadpool(svc.batched.check, modality, blob, name)
        except InputError as e:
            raise input_error(e, modality) from None
        media[modality] = blob
    svc.metrics.items.labels("/v1/search", "text").inc(query.text is not None)
    for modality in _QUERIES:
        svc.metrics.items.labels("/v1/search", modality).inc(modality in media)
    hits = await run_in_threadpool(_search, svc, store, query, media)
    return SearchResponse(hits=hits)


def _search(svc: Services, store: Any, query: SearchQuery, media: dict[str, bytes]) -> list[SearchHit]:
    from rosetta.search import search

    weights = tuple(query.weights) if query.weights is not None else None
    try:
        hits = search(svc.batched, store, text=query.text, weights=weights, k=query.k, where=query.where, **media)
    except InputError as e:
        raise input_error(e, next(iter(media), "image")) from None
    except (RosettaError, ValueError) as e:
        raise ApiError(422, "invalid_query", str(e)) from None
    return [_hit(hit) for hit in hits]


def _hit(hit: Any) -> SearchHit:
    metadata = dict(hit.metadata or {})
    path = metadata.get("path")
    url = quote(hit.id, safe="/")
    recording = "media" in metadata  # a sound or a video, found by one of its windows
    return SearchHit(id=hit.id, path=str(path) if path is not None else None, score=float(hit.score),
                     metadata=_jsonable(metadata),
                     thumbnail=f"/v1/thumbnail/{url}" if path and not recording else None,
                     media=f"/v1/media/{url}" if path and recording else None,
                     start=metadata.get("start"), end=metadata.get("end"))


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as JSON can carry it: NaN and infinities become null, numpy scalars plain numbers."""
    out = {}
    for key, value in metadata.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            value = None
        elif not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        out[str(key)] = value
    return out


@retrieval.post(
    "/index", response_model=IndexResponse,
    summary="upload images, sounds and videos: saved under the store's uploads folder, indexed",
    description="Each file is told apart by its bytes (a sound or a video named with a sound's or video's suffix "
                "keeps it, as `rosetta index` goes by it) and stored as `rosetta index` stores it: an image as "
                "one row, a sound or a video window by window. Every file must decode (a sound needs a model "
                "that hears, and no sound or video may be longer than the server's limit); if one does not, "
                "nothing is saved and the answer names it.",
    responses=error_responses(400, 413, 415, 422, 503),
)
async def index_route(
    request: Request,
    files: Annotated[list[UploadFile], File(description="image, sound and video files to add to the store")],
) -> IndexResponse:
    svc = services(request)
    store = _require_store(svc)
    _check_count("files", len(files), svc.settings.max_items)
    if not files:
        raise ApiError(422, "empty_request", "files: upload at least one image, sound or video")
    blobs, names = await _read_uploads(files)
    kinds = [_upload_kind(blob, name) for blob, name in zip(blobs, names)]
    for modality in _QUERIES:
        svc.metrics.items.labels("/v1/index", modality).inc(sum(m == modality for m, _ in kinds))
    await _check_uploads(svc, blobs, names, [modality for modality, _ in kinds])
    async with svc.store_lock:
        items = await run_in_threadpool(_save_and_index, svc, store, blobs, names, kinds)
        count = await run_in_threadpool(len, store)
    return IndexResponse(indexed=items, count=count)


async def _check_images(svc: Services, blobs: Sequence[bytes], names: Sequence[str]) -> None:
    """Decode every upload before anything else happens, so that a bad one is named and nothing is saved."""
    await run_in_threadpool(lambda: [svc.batched.preprocess(blob, name) for blob, name in zip(blobs, names)])


async def _check_uploads(svc: Services, blobs: Sequence[bytes], names: Sequence[str], modalities: Sequence[str]
                         ) -> None:
    """Refuse, before anything is saved, any upload the model cannot take: not decodable, over the pixel or
    length limits, or of a modality the model has no tower for; the 4xx names it."""

    def check() -> None:
        for blob, name, modality in zip(blobs, names, modalities):
            try:
                if modality == "image":
                    svc.batched.preprocess(blob, name)
                else:
                    svc.batched.check(modality, blob, name)
            except InputError as e:
                raise input_error(e, modality) from None

    await run_in_threadpool(check)


def _upload_kind(blob: bytes, name: str) -> tuple[str, str]:
    """An upload's modality and the suffix it is saved with, so that the uploads folder is itself an indexable
    folder: an image's by its format; a sound's or video's its own name's, where that names one, else by its
    bytes (the index tells sounds from videos by suffix, and Matroska or MP4 bytes may be either)."""
    from rosetta.modalities.audio import AUDIO_SUFFIXES, VIDEO_SUFFIXES
    from rosetta.modalities.sniff import media_suffix, modality_of

    suffix = media_suffix(blob)
    if suffix is None:
        return "image", _suffix(blob)
    own = Path(name).suffix.lower()
    if own in AUDIO_SUFFIXES | VIDEO_SUFFIXES:
        suffix = own
    return modality_of(f"upload{suffix}"), suffix


def uploads_dir(store: Any) -> Path:
    """The store's uploads folder: `uploads/` inside the store's directory."""
    path = getattr(store, "path", None)
    if isinstance(path, (str, Path)) and "://" not in str(path):
        return Path(path) / "uploads"
    raise ApiError(503, "no_uploads_folder", "this store is not a directory: uploads cannot be saved beside it")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _save_and_index(svc: Services, store: Any, blobs: list[bytes], names: list[str],
                    kinds: list[tuple[str, str]]) -> list[IndexedItem]:
    """Save the uploads and index them as `rosetta index` indexes files (through the batched model). A file the
    checks passed that still fails to index (a video without frames) is named in a 4xx and its saved copy
    removed; the others stay indexed."""
    from rosetta.files import atomic_write
    from rosetta.store.index import file_id, index_files

    folder = uploads_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    paths, written = [], set()
    for blob, name, (_, suffix) in zip(blobs, names, kinds):
        stem = _UNSAFE.sub("_", Path(name).stem)[:64].strip("._") or "upload"
        path = folder / f"{hashlib.sha256(blob).hexdigest()[:16]}-{stem}{suffix}"  # same bytes, same file
        if not path.exists():
            atomic_write(path, lambda f, blob=blob: f.write(blob))
            written.add(path)
        paths.append(path)
    report = index_files(svc.batched, store, paths, batch_size=svc.settings.max_batch, progress=False)
    if report.failed:
        indexed = set(report.ids)
        failed = [(name, path, modality) for name, path, (modality, _) in zip(names, paths, kinds)
                  if file_id(path) not in indexed]
        for _, path, _ in failed:
            if path in written:
                path.unlink(missing_ok=True)

        def reason(path: Path) -> str:  # the report names the saved file; the client knows its upload's name
            line = next((line for line in report.failed if line.startswith(f"{path}: ")), "")
            return line.removeprefix(f"{path}: ") or "not indexed"

        message = "; ".join(f"{name}: {reason(path)}" for name, path, _ in failed)
        if len(failed) < len(paths):
            message += f" (the other {len(paths) - len(failed)} files were indexed)"
        raise input_error(InputError(message), failed[0][2] if failed else "image")
    return [IndexedItem(id=file_id(p), path=str(p), filename=n) for p, n in zip(paths, names)]


def _suffix(blob: bytes) -> str:
    """The file suffix of an image's format, so that the uploads folder is itself an indexable folder."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:
            format_ = (image.format or "").lower()
    except Exception:  # it decoded before; this only names the file
        return ".img"
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(format_, f".{format_}" if format_ else ".img")


@retrieval.get(
    "/thumbnail/{id:path}", summary="a JPEG thumbnail of a stored image (only images in the store are served)",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
               **error_responses(404, 413, 422, 503)},
)
async def thumbnail(request: Request, id: Annotated[str, PathParam(description="a stored item's id")]) -> Response:
    svc = services(request)
    store = _require_store(svc)
    metadata = (await run_in_threadpool(store.metadata, [id])).get(id)
    path = metadata.get("path") if metadata else None
    if not path:
        raise ApiError(404, "not_found", f"no stored image with id {id!r}")
    data = await run_in_threadpool(_thumbnail, Path(path), svc.settings)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@retrieval.get(
    "/media/{id:path}", summary="a stored sound or video file, as it is (only files in the store are served)",
    response_class=FileResponse,
    responses={200: {"content": {"audio/*": {}, "video/*": {}}, "description": "the file; byte ranges honoured"},
               **error_responses(404, 422, 503)},
)
async def media_file(request: Request, id: Annotated[str, PathParam(description="a stored file's id")]) -> FileResponse:
    from rosetta.store.index import segment_id

    store = _require_store(services(request))
    found = await run_in_threadpool(store.metadata, [segment_id(id, 0)])  # a recording's first window names it
    path = Path(found[segment_id(id, 0)]["path"]) if found else None
    if path is None:
        raise ApiError(404, "not_found", f"no stored sound or video with id {id!r}")
    if not path.is_file():
        raise ApiError(404, "not_found", f"the stored file {path.name} is gone")
    return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                        headers={"Cache-Control": "private, max-age=3600"})


def _thumbnail(path: Path, settings: Settings) -> bytes:
    from rosetta.modalities.image import load_image

    if not path.is_file():
        raise ApiError(404, "not_found", f"the stored file {path.name} is gone")
    image = load_image(path, max_pixels=settings.max_pixels)
    image.thumbnail((settings.thumbnail_size, settings.thumbnail_size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


@monitoring.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    body, content_type = services(request).metrics.render()
    return Response(body, media_type=content_type)


# The app


def create_app(model, store=None, settings: Settings | None = None) -> FastAPI:
    """The API around `model` (and `store`, for search and indexing); the model threads run while the app does."""
    from rosetta import __version__
    from rosetta.store.index import model_name

    settings = settings or Settings()
    can = capabilities(model)
    if not can:
        raise RosettaError(f"a {type(model).__name__} neither embeds nor generates: nothing to serve")
    if not settings.model_name:
        settings = dataclasses.replace(settings, model_name=model_name(model) if "embed" in can else _name(model))
    metrics_ = Metrics()
    svc = Services(settings, model, metrics_, store=store)
    if "embed" in can:
        if settings.compile and "image" in embedded_modalities(model):
            compile_image_tower(model)
        svc.cache = EmbeddingCache(settings.cache_size)
        svc.batcher = MicroBatcher(model_runners(model), max_batch=settings.max_batch,
                                   max_wait_ms=settings.max_wait_ms, enabled=settings.batching,
                                   max_queue=settings.max_queue, metrics=metrics_, batch_limits=BATCH_LIMITS)
        svc.batched = BatchedModel(model, svc.batcher, svc.cache, settings.model_name, settings.max_pixels, metrics_,
                                   max_seconds=settings.max_audio_seconds)
    if "generate" in can:
        from rosetta.serve.generation import TextGenerator, text_model

        svc.generator = TextGenerator(text_model(model), max_batch=settings.max_sequences, max_queue=settings.max_queue,
                                      metrics=metrics_, compile=settings.compile)
    workers = [w for w in (svc.batcher, svc.generator) if w is not None]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        release_openmp_threads()  # the models run on the workers' threads: see its docstring
        for worker in workers:
            worker.start()
        try:
            yield
        finally:
            for worker in workers:  # the batcher finishes queued work: in-flight requests get answers
                await run_in_threadpool(worker.stop)

    # No /docs or /redoc: they load Swagger UI and ReDoc from a CDN, and the server may have no internet.
    app = FastAPI(title="Rosetta", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Embeddings, zero-shot classification, search and text generation with one model.")
    app.state.rosetta = svc
    install_error_handlers(app)
    protected = [Depends(require_api_key)] if settings.api_key else []
    auth_errors = error_responses(401) if settings.api_key else {}
    for router, needs in OPEN_ROUTERS:
        if _served(needs, can):
            app.include_router(router)
    for router, needs in ROUTERS:
        if _served(needs, can):
            app.include_router(router, dependencies=protected, responses=auth_errors)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(MetricsMiddleware, metrics=metrics_, router=app.router)
    return app


def _name(model) -> str:
    """A generative model's name when the server was not given one: what it was loaded as, else its preset."""
    from rosetta.models.registry import presets

    name = getattr(model, "name", None)
    if isinstance(name, str) and name:
        return name
    return next((preset for preset, config in presets().items() if config == model.config), "rosetta")
