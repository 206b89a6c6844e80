"""OpenAI's text endpoints for a language model: `POST /v1/chat/completions`, `POST /v1/completions` and
`GET /v1/models`, in OpenAI's wire format, so that the `openai` SDK (and anything built on it) works against
`rosetta serve` unchanged.

Every request becomes engine requests for the server's `TextGenerator` (continuous batching); `stream: true`
answers with server-sent events ending in `data: [DONE]`. A client that goes away stops its sequences.
A model the server runs no engine for (a hosted one, OCR) answers chat completions itself, as it answers
/v1/caption and /v1/ask; a stream then carries its whole reply in one chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from rosetta.errors import InputError
from rosetta.generation.constraints import SchemaError
from rosetta.generation.engine import Completion
from rosetta.serve.common import ApiError, error_responses, services
from rosetta.serve.generation import Stream, text_model

chat = APIRouter(prefix="/v1", tags=["text generation"])  # every model that answers conversations
completions = APIRouter(prefix="/v1", tags=["text generation"])  # a local language model's text continuations


# Requests


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str = Field(description="a data: URL (base64); http(s) only on a server started with --allow-remote-images")
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_call_id, name, reasoning...: the chat template may read them

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints take. Unset fields fall back to the checkpoint's generation defaults."""

    model: str | None = Field(None, description="accepted and echoed; the server runs one model")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="an extension: sample among the k most likely tokens")
    min_p: float | None = Field(None, ge=0, le=1, description="an extension")
    repetition_penalty: float | None = Field(None, gt=0, description="an extension")
    n: int = Field(1, ge=1, le=16, description="how many completions of the prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = Field(False, description="an extension: generate max_tokens whatever the model says")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, description="only 0 is supported")
    logprobs: bool | int | None = Field(None, description="not supported")
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="passed to the chat template")
    tool_choice: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(description="a text, several texts, or token ids")
    max_tokens: int | None = Field(16, ge=1, description="most tokens to generate (OpenAI's default: 16)")
    echo: bool = False
    suffix: str | None = Field(None, description="not supported")


# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rosetta"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_ERRORS = error_responses(400, 413, 415, 422, 503)


@chat.get("/models", response_model=ModelList, summary="the model this server runs")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=_model_name(request), created=int(time.time()))])


@chat.post("/chat/completions", response_model=ChatCompletion, responses={**_ERRORS, **error_responses(502)},
           summary="the assistant's reply to a conversation (OpenAI's chat completions)")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    from rosetta.serve.vision import fetcher, sees

    svc = services(request)
    schema = _schema(body.response_format)
    max_tokens = body.max_completion_tokens or body.max_tokens
    reply_id, created, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), _model_name(request)
    if svc.generator is None:
        return await _chat_elsewhere(svc, body, schema, max_tokens, reply_id, created, name)
    seeing = sees(svc.model)
    messages = [m.model_dump(exclude_none=True) if seeing else _plain(m) for m in body.messages]

    def prepare() -> list:
        if seeing:
            prompt, embeds = svc.model.prompt_embeds(messages, fetcher(svc.settings))
            return _requests(svc, prompt, body, max_tokens, schema, embeds)
        prompt = svc.model.chat_prompt(messages, tools=body.tools)
        return _requests(svc, prompt, body, max_tokens, schema)

    requests = await _prepared(prepare)
    streams = _submit(svc, requests)
    prompt_tokens = len(requests[0].prompt)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chat_chunks(_decoded(streams), len(streams), reply_id, created, name,
                              lambda done: _usage(prompt_tokens, done), include_usage)
        return _sse(chunks, streams)
    done = await _finish(request, streams)
    return _chat_completion(reply_id, created, name, done, _usage(prompt_tokens, done))


async def _chat_elsewhere(svc, body: ChatCompletionRequest, schema, max_tokens: int | None, reply_id: str,
                          created: int, name: str):
    """The reply of a model that answers by itself (a hosted one, OCR): temperature, seed, the token limit and
    the response format reach it; a stream is its whole reply in one chunk."""
    from rosetta.serve.vision import answered_elsewhere

    if body.n > 1:
        raise ApiError(422, "unsupported", f"n={body.n}: this model gives one reply per request")
    if body.tools:
        raise ApiError(422, "unsupported", "tools: not passed on to this model")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    done, usage = await answered_elsewhere(svc, [messages], body, max_tokens, schema)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_chat_chunks(_whole(done), len(done), reply_id, created, name, lambda _: usage, include_usage),
                    [])
    return _chat_completion(reply_id, created, name, done, usage)


def _chat_completion(reply_id: str, created: int, name: str, done: Sequence[Completion],
                     usage: Usage) -> ChatCompletion:
    return ChatCompletion(
        id=reply_id, created=created, model=name,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                 for i, c in enumerate(done)],
        usage=usage,
    )


@completions.post("/completions", response_model=TextCompletion, responses=_ERRORS,
                  summary="the continuation of a prompt (OpenAI's legacy completions)")
async def text_completions(request: Request, body: CompletionRequest):
    svc = services(request)
    if body.suffix:
        raise ApiError(422, "unsupported", "suffix: not supported (this endpoint continues a prompt)")
    prompts: Sequence[str | list[int]]
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif body.prompt and all(isinstance(p, int) for p in body.prompt):
        prompts = [body.prompt]  # token ids
    else:
        prompts = list(body.prompt)
    if not prompts:
        raise ApiError(422, "invalid_request", "prompt: give at least one prompt")
    if len(prompts) * body.n > svc.settings.max_items:
        raise ApiError(413, "too_many_items", f"{len(prompts) * body.n} completions in one request; the limit is "
                                              f"{svc.settings.max_items}")

    decoder = text_model(svc.model)

    def prepare() -> list:
        out = []
        for p in prompts:
            ids = decoder.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if any(not 0 <= i < decoder.config.vocab_size for i in ids):
                raise InputError(f"prompt: token ids must be in [0, {decoder.config.vocab_size})")
            out += _requests(svc, ids, body, body.max_tokens, None)
        return out

    requests = await _prepared(prepare)
    streams = _submit(svc, requests)
    echoes = [p if isinstance(p, str) else decoder.tokenizer.decode(p) for p in prompts for _ in range(body.n)]
    echoes = echoes if body.echo else [""] * len(echoes)
    reply_id, created, name = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), _model_name(request)
    prompt_tokens = sum(len(r.prompt) for r in requests[:: body.n])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_text_chunks(streams, echoes, reply_id, created, name, prompt_tokens, include_usage), streams)
    done = await _finish(request, streams)
    return TextCompletion(
        id=reply_id, created=created, model=name,
        choices=[CompletionChoice(index=i, text=echoes[i] + c.text, finish_reason=c.finish_reason)
                 for i, c in enumerate(done)],
        usage=_usage(prompt_tokens, done),
    )


# Requests to engine requests


def _model_name(request: Request) -> str:
    return services(request).settings.model_name or "rosetta"


def _plain(message: Message) -> dict[str, Any]:
    """A message as a text model's chat template reads it: text parts joined into one string."""
    data = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        if any(isinstance(part, ImagePart) for part in message.content):
            raise ApiError(422, "invalid_request", "image_url: this model does not read images")
        data["content"] = "\n".join(part.text for part in message.content)
    return data


def _schema(response_format: ResponseFormat | None) -> dict[str, Any] | bool | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None:
        raise ApiError(422, "invalid_request", "response_format.json_schema: required with type json_schema")
    return response_format.json_schema.schema_


def _requests(svc, prompt: list[int], body: _Sampling, max_tokens: int | None, schema,
              embeds=None) -> list:
    """The engine requests of one prompt (n of them; `embeds`: the prompt's embeddings, images spliced in), with
    the server's limits applied."""
    from rosetta.generation.tasks import request

    if body.presence_penalty or body.frequency_penalty:
        raise InputError("presence_penalty and frequency_penalty: not supported (use repetition_penalty)")
    if body.logprobs:
        raise InputError("logprobs: not supported")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InputError("stop: at most 4 stop strings")
    limit = svc.settings.max_new_tokens
    decoder = text_model(svc.model)
    context = decoder.context_length
    if not prompt:
        raise InputError("prompt: empty (give at least one token)")
    if len(prompt) >= context:
        raise ApiError(400, "context_length_exceeded",
                       f"the prompt has {len(prompt)} tokens; this model's context window is {context}")
    check_max_tokens(svc, max_tokens)
    max_tokens = max_tokens or min(limit, context - len(prompt))
    options = dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                   repetition_penalty=body.repetition_penalty, stop=stop, json_schema=schema)
    return [request(decoder, prompt, max_tokens, seed=None if body.seed is None else body.seed + i,
                    ignore_eos=body.ignore_eos, prompt_embeds=embeds, **options)
            for i in range(body.n)]


def check_max_tokens(svc, max_tokens: int | None) -> None:
    limit = svc.settings.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        raise ApiError(422, "max_tokens_too_large", f"max_tokens={max_tokens}; this server's limit is {limit}")


def _submit(svc, requests: list) -> list[Stream]:
    """Queue every request of one HTTP request, or none: if the queue refuses one, the others are withdrawn."""
    streams: list[Stream] = []
    try:
        for r in requests:
            streams.append(svc.generator.submit(r))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return streams


async def _prepared(prepare):
    """Tokenise, render the template and compile the schema off the event loop; bad input is a 4xx."""
    try:
        return await run_in_threadpool(prepare)
    except SchemaError as e:
        raise ApiError(422, "invalid_schema", str(e)) from None
    except InputError as e:
        raise ApiError(422, "invalid_request", str(e)) from None


def _usage(prompt_tokens: int, done: Sequence[Completion]) -> Usage:
    completion_tokens = sum(len(c.tokens) for c in done)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


# Running them


async def _finish(request: Request, streams: list[Stream]) -> list[Completion]:
    """Every stream's completion; if the client disconnects first, its sequences are stopped."""
    work = asyncio.ensure_future(asyncio.gather(*(s.completion() for s in streams)))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError
    except BaseException:
        work.cancel()
        for s in streams:
            s.cancel()
        raise


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from several streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(i: int, stream: Stream) -> None:
        try:
            async for event in stream.events():
                await queue.put((i, event))
        except BaseException as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(forward(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            remaining -= item.finished
    finally:
        for t in tasks:
            t.cancel()


def _sse(chunks: AsyncIterator[dict[str, Any]], streams: list[Stream]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except Exception as e:  # after the headers went out, an error can only be told in the stream
            yield f"data: {json.dumps({'error': {'code': 'internal', 'message': str(e)}})}\n\n".encode()
        finally:  # the client went away, or it is over: either way nothing more is decoded for it
            for s in streams:
                s.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _decoded(streams: list[Stream]) -> AsyncIterator[tuple[int, str, Completion | None]]:
    """(choice index, text delta, the completion once it is finished) as the engine decodes."""
    async for i, event in _merged(streams):
        yield i, event.text, event.sequence.completion() if event.finished else None


async def _whole(done: Sequence[Completion]) -> AsyncIterator[tuple[int, str, Completion | None]]:
    """The same for replies that came back whole."""
    for i, completion in enumerate(done):
        yield i, completion.text, completion


async def _chat_chunks(replies, n, reply_id, created, name, usage_of, include_usage):
    def chunk(choices, usage=None):
        out = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": name,
               "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
                 for i in range(n)])
    done = {}
    async for i, text, completion in replies:
        if text:
            yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None, "logprobs": None}])
        if completion is not None:
            done[i] = completion
            yield chunk([{"index": i, "delta": {}, "finish_reason": completion.finish_reason, "logprobs": None}])
    if include_usage:
        yield chunk([], usage_of(list(done.values())).model_dump())


async def _text_chunks(streams, echoes, reply_id, created, name, prompt_tokens, include_usage):
    def chunk(choices, usage=None):
        out = {"id": reply_id, "object": "text_completion", "created": created, "model": name, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    for i, echo in enumerate(echoes):
        if echo:
            yield chunk([{"index": i, "text": echo, "finish_reason": None, "logprobs": None}])
    done = {}
    async for i, event in _merged(streams):
        if event.text or event.finished:
            reason = None
            if event.finished:
                done[i] = event.sequence.completion()
                reason = done[i].finish_reason
            yield chunk([{"index": i, "text": event.text, "finish_reason": reason, "logprobs": None}])
    if include_usage:
        yield chunk([], _usage(prompt_tokens, list(done.values())).model_dump())


