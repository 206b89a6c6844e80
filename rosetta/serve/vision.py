"""The vision-language endpoints: `POST /v1/caption`, `/v1/ask` and `/v1/extract`.

Images come as data: URLs or bare base64; http(s) URLs only when the server was started with
--allow-remote-images (the server would otherwise fetch whatever a request names, inside its own network).
Every answer of a local model is decoded by the server's `TextGenerator`, with the requests of every other
endpoint: the images are encoded off the event loop, the prompt joins the running batch as embeddings. A model
that answers by itself (a hosted one, OCR) is asked through its `reply_with_usage`, off the event loop.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from rosetta.errors import InputError
from rosetta.serve.common import ApiError, Settings, error_responses, services
from rosetta.serve.openai import Usage, _finish, _prepared, _requests, _Sampling, _submit, _usage, check_max_tokens

vision = APIRouter(prefix="/v1", tags=["vision-language"])
FETCH_TIMEOUT_S = 10.0


class _ImagesRequest(_Sampling):
    images: list[str] = Field(min_length=1, description="data: URLs or bare base64 (http(s) URLs with "
                                                        "--allow-remote-images)")


class CaptionRequest(_ImagesRequest):
    prompt: str | None = Field(None, description="what to ask for (default: a one-sentence description)")


class AskRequest(_ImagesRequest):
    question: str = Field(min_length=1)


class ExtractRequest(_ImagesRequest):
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema of the fields to read")
    prompt: str | None = Field(None, description="the instruction, with {schema} where the schema goes")


class Captions(BaseModel):
    model: str
    created: int
    captions: list[str]
    usage: Usage


class Answer(BaseModel):
    model: str
    created: int
    answer: str
    usage: Usage


class Extraction(BaseModel):
    model: str
    created: int
    fields: list[dict[str, Any]]
    usage: Usage


def sees(model) -> bool:
    """Does the model read images itself (a local vision-language model), rather than send them to a vendor?"""
    return callable(getattr(model, "prompt_embeds", None))


def fetcher(settings: Settings):
    """How image URLs are fetched: not at all unless the server allows it; then with a timeout and a size limit."""
    if not settings.allow_remote_images:
        return None

    def fetch(url: str) -> bytes:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(settings.max_body_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise InputError(f"image_url {url}: could not fetch it ({e})") from None
        if len(data) > settings.max_body_bytes:
            raise InputError(f"image_url {url}: larger than {settings.max_body_bytes} bytes")
        return data

    return fetch


def _part(image: str) -> dict[str, Any]:
    url = image if image.startswith(("data:", "http://", "https://")) else f"data:image/*;base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _conversation(images: list[str], text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*(_part(i) for i in images), {"type": "text", "text": text}]}]


async def _run(request: Request, body: _ImagesRequest, conversations: list, schema=None):
    svc = services(request)
    if len(body.images) > svc.settings.max_items:
        raise ApiError(413, "too_many_items", f"{len(body.images)} images in one request; the limit is "
                                              f"{svc.settings.max_items}")
    if not sees(svc.model):
        if any(i.startswith(("http://", "https://")) for i in body.images):
            raise ApiError(422, "invalid_request", "image_url: only data: URLs are read (a hosted model is sent the "
                                                   "image itself)")
        done, usage = await answered_elsewhere(svc, conversations, body, body.max_tokens, schema)
        return done, usage, svc.settings.model_name or "rosetta"
    fetch = fetcher(svc.settings)

    def prepare() -> list:
        out = []
        for conversation in conversations:
            ids, embeds = svc.model.prompt_embeds(conversation, fetch)
            out += _requests(svc, ids, body, body.max_tokens, schema, embeds)
        return out

    requests = await _prepared(prepare)
    done = await _finish(request, _submit(svc, requests))
    prompt_tokens = sum(len(r.prompt) for r in requests[:: body.n])
    return done, _usage(prompt_tokens, done), svc.settings.model_name or "rosetta"


async def answered_elsewhere(svc, conversations: list, body: _Sampling, max_tokens: int | None,
                             schema) -> tuple[list, Usage]:
    """The replies of a model that answers by itself, one per conversation, and their usage: a hosted model's
    own requests to its vendor (cached, retried), or OCR's reading, off the event loop."""
    from rosetta.errors import RosettaError
    from rosetta.generation.engine import Completion

    check_max_tokens(svc, max_tokens)
    options = {k: v for k, v in (("temperature", body.temperature), ("seed", body.seed)) if v is not None}
    try:
        # A schema's JSON cut short never validates: it gets the room HostedModel.extract gives it.
        default = 256 if schema is None else 1024
        texts, usage = await run_in_threadpool(svc.model.reply_with_usage, conversations, max_tokens or default,
                                               json_schema=schema, **options)
    except InputError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    except RosettaError as e:  # the vendor failed, or refused the key
        raise ApiError(502, "upstream_error", str(e)) from None
    done = [Completion(text=t, tokens=[], finish_reason="stop", prompt_tokens=0, seconds_to_first_token=None)
            for t in texts]
    return done, Usage(prompt_tokens=usage.input_tokens, completion_tokens=usage.output_tokens,
                       total_tokens=usage.input_tokens + usage.output_tokens)


_ERRORS = error_responses(400, 413, 422, 502, 503)


@vision.post("/caption", response_model=Captions, responses=_ERRORS, summary="a caption for each image")
async def caption(request: Request, body: CaptionRequest) -> Captions:
    from rosetta.models.vlm import CAPTION_PROMPT

    done, usage, name = await _run(request, body, [_conversation([image], body.prompt or CAPTION_PROMPT)
                                                   for image in body.images])
    return Captions(model=name, created=int(time.time()), captions=[c.text for c in done], usage=usage)


@vision.post("/ask", response_model=Answer, responses=_ERRORS, summary="the answer to a question about the images")
async def ask(request: Request, body: AskRequest) -> Answer:
    done, usage, name = await _run(request, body, [_conversation(body.images, body.question)])
    return Answer(model=name, created=int(time.time()), answer=done[0].text, usage=usage)


@vision.post("/extract", response_model=Extraction, responses=_ERRORS,
             summary="the fields of a JSON Schema read from each image (always valid against it)")
async def extract(request: Request, body: ExtractRequest) -> Extraction:
    from rosetta.models.vlm import EXTRACT_PROMPT

    question = (body.prompt or EXTRACT_PROMPT).replace("{schema}", json.dumps(body.schema_))
    done, usage, name = await _run(request, body, [_conversation([image], question) for image in body.images],
                                   schema=body.schema_)
    fields = []
    for c in done:
        try:
            fields.append(json.loads(c.text))
        except json.JSONDecodeError:
            raise ApiError(422, "incomplete_json", f"the answer is not complete JSON within {len(c.tokens)} tokens "
                                                   "(raise max_tokens)") from None
    return Extraction(model=name, created=int(time.time()), fields=fields, usage=usage)
