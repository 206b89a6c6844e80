"""What every hosted vision-language model shares: the tasks (the same calls as a local model), the response
cache, retries, timeouts, token usage and cost. A vendor module supplies only `_send` (one request in its
wire format, through its official SDK) and `_failure` (how its SDK reports an error).

    conversation ─▶ parts (text; images decoded, checked, re-encoded) ─▶ cache key (image content hashes)
                 ─▶ cache hit: the stored reply │ miss: _send, retried on 429 / 5xx / timeouts with
                    exponential backoff and jitter (Retry-After honoured) ─▶ stored ─▶ usage and cost
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosetta.errors import InputError, RosettaError

# US dollars per million input and output tokens, as the vendors list them (December 2026). Data, not code:
# pass `prices=` or set ROSETTA_PRICES to a JSON file of {"model": [input, output]} to override.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60),
    "claude-sonnet-4-5": (3.00, 15.00), "claude-haiku-4-5": (1.00, 5.00), "claude-opus-4-1": (15.00, 75.00),
    "gemini-2.5-flash": (0.30, 2.50), "gemini-2.5-pro": (1.25, 10.00), "gemini-2.5-flash-lite": (0.10, 0.40),
}
MAX_SIDE = 2048  # images are sent at most this long on their longer side (the vendors downscale beyond)


class Retryable(Exception):
    """A failure worth trying again (rate limit, server error, timeout), perhaps after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Usage:
    calls: int = 0  # requests that reached the vendor
    cached: int = 0  # replies served from the cache
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0  # None when the model's price is unknown

    def add(self, other: Usage) -> None:
        for name in ("calls", "cached", "retries", "input_tokens", "output_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_usd = None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd


@dataclass(frozen=True)
class Reply:
    text: str
    input_tokens: int
    output_tokens: int


@dataclass
class Image:
    """An image as the vendors take it: bytes, their media type, and a hash of the content (the cache key)."""

    data: bytes
    media_type: str
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(self.data).hexdigest()

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data).decode()


class HostedModel:
    """A vision-language model behind a vendor's API, with a local model's calls: caption, ask, chat, extract."""

    vendor = ""
    key_variables: tuple[str, ...] = ()  # where the vendor's SDK looks for the key, in order

    def __init__(self, model: str, api_key: str | None = None, base_url: str | None = None, timeout: float = 60.0,
                 max_retries: int = 4, cache: bool | str | os.PathLike = True,
                 prices: Mapping[str, tuple[float, float]] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self.name = f"{self.vendor}:{model}"
        self.api_key = api_key or next((os.environ[v] for v in self.key_variables if os.environ.get(v)), None)
        if not self.api_key:
            raise RosettaError(f"{self.name}: no API key (set {' or '.join(self.key_variables)})")
        self.base_url, self.timeout, self.max_retries, self._sleep = base_url, timeout, max_retries, sleep
        self.cache_dir = _cache_dir(cache)
        self.prices = {**PRICES, **_prices_from_env(), **(prices or {})}
        self.usage = Usage()  # of every call so far; `last_usage` of the latest
        self.last_usage = Usage()
        self.client = self._client()

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self.name!r})"

    # The tasks, as on a local model.

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, **options: Any) -> str:
        return self.reply([messages], max_new_tokens, **options)[0]

    def ask(self, images, question: str, max_new_tokens: int = 256, **options: Any) -> str:
        from rosetta.models.vlm import user

        return self.reply([[user(images, question)]], max_new_tokens, **options)[0]

    def caption(self, images, prompt: str | None = None, max_new_tokens: int = 64, **options: Any):
        from rosetta.models.vlm import CAPTION_PROMPT, user

        many = isinstance(images, (list, tuple))
        captions = self.reply([[user([i], prompt or CAPTION_PROMPT)] for i in (images if many else [images])],
                              max_new_tokens, **options)
        return captions if many else captions[0]

    def extract(self, image, schema: Mapping[str, Any] | str, prompt: str | None = None, max_new_tokens: int = 1024,
                **options: Any) -> dict[str, Any]:
        """The fields of `schema` read from an image, in the vendor's structured-output mode, validated against
        the schema (and asked once more if the first reply does not validate)."""
        from rosetta.models.vlm import EXTRACT_PROMPT, user

        schema = json.loads(schema) if isinstance(schema, str) else dict(schema)
        question = (prompt or EXTRACT_PROMPT).replace("{schema}", json.dumps(schema))
        return json.loads(self.reply([[user([image], question)]], max_new_tokens, json_schema=schema, **options)[0])

    def check_schema(self, schema: Mapping[str, Any]) -> None:
        """InputError unless `schema` is a valid JSON Schema."""
        check_schema(schema)

    def reply(self, conversations: Sequence[Sequence[Mapping[str, Any]]], max_new_tokens: int = 256,
              **options: Any) -> list[str]:
        """The assistant's reply to each conversation (one request each). With `json_schema`, each reply is JSON
        that validates against it: the vendor's structured-output mode, checked, asked once more if it fails."""
        texts, self.last_usage = self.reply_with_usage(conversations, max_new_tokens, **options)
        return texts

    def reply_with_usage(self, conversations, max_new_tokens: int = 256, json_schema=None,
                         **options: Any) -> tuple[list[str], Usage]:
        usage = Usage()
        if json_schema is not None:
            check_schema(json_schema)
        texts = []
        for conversation in conversations:
            if json_schema is None:
                texts.append(self._reply(conversation, max_new_tokens, usage, **options))
                continue
            problem = ""
            for attempt in range(2):
                text = self._reply(conversation, max_new_tokens, usage, json_schema=json_schema, attempt=attempt,
                                   **options)
                try:
                    validate(json.loads(text), json_schema)
                    texts.append(text)
                    break
                except ValueError as e:  # JSONDecodeError is one
                    problem = str(e).splitlines()[0]
            else:
                raise RosettaError(f"{self.name}: the reply did not validate against the schema twice ({problem})")
        return texts, usage

    # One request: cache, retries, usage.

    def _reply(self, messages, max_new_tokens: int, usage: Usage, temperature: float | None = None,
               json_schema=None, seed: int | None = None, attempt: int = 0, **ignored: Any) -> str:
        system, turns = to_parts(messages)
        key = _key({"model": self.name, "system": system, "turns": [[_keyed(p) for p in parts] for _, parts in turns],
                    "roles": [role for role, _ in turns], "max_tokens": max_new_tokens, "temperature": temperature,
                    "schema": json_schema, "seed": seed, "attempt": attempt})
        cached = self._cached(key)
        if cached is not None:
            self._count(usage, Usage(cached=1))
            return cached
        reply, retries = self._send_with_retries(system, turns, max_new_tokens, temperature, json_schema, seed)
        price = self.prices.get(self.model)
        cost = None if price is None else (reply.input_tokens * price[0] + reply.output_tokens * price[1]) / 1e6
        self._count(usage, Usage(calls=1, retries=retries, input_tokens=reply.input_tokens,
                                 output_tokens=reply.output_tokens, cost_usd=cost))
        self._store(key, reply.text)
        return reply.text

    def _send_with_retries(self, *request) -> tuple[Reply, int]:
        for retry in range(self.max_retries + 1):
            try:
                return self._send(*request), retry
            except Retryable as e:
                if retry == self.max_retries:
                    raise RosettaError(f"{self.name}: {e} (gave up after {retry + 1} tries)") from None
                backoff = min(60.0, 0.5 * 2**retry) * (0.5 + random.random())  # exponential, with jitter
                self._sleep(max(backoff, e.retry_after or 0.0))
        raise AssertionError("unreachable")

    def _count(self, call: Usage, usage: Usage) -> None:
        call.add(usage)
        self.usage.add(usage)

    def _cached(self, key: str) -> str | None:
        path = self.cache_dir / f"{key}.json" if self.cache_dir else None
        if path is None or not path.exists():
            return None
        try:
            return json.loads(path.read_text())["text"]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is a miss

    def _store(self, key: str, text: str) -> None:
        if self.cache_dir is not None:
            from rosetta.files import write_json

            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.cache_dir / f"{key}.json", {"model": self.name, "text": text})

    # What a vendor module supplies.

    def _client(self):
        raise NotImplementedError

    def _send(self, system: str | None, turns: list, max_tokens: int, temperature: float | None,
              schema: dict | None, seed: int | None) -> Reply:
        raise NotImplementedError


def sdk_failure(name: str, e: Exception, sdk, key_variable: str) -> Exception:
    """What an error of OpenAI's or Anthropic's SDK means here (both SDKs raise the same classes): a refused key
    or a client error is the caller's one line; a rate limit, a server error, a timeout or a connection failure
    is worth another try; anything else the SDK raised on a reply is a malformed reply."""
    from rosetta.hosted.retry_after import retry_after

    if isinstance(e, (sdk.AuthenticationError, sdk.PermissionDeniedError)):
        return RosettaError(f"{name}: the API key was refused ({e.status_code}); check {key_variable}")
    if isinstance(e, sdk.APIStatusError):
        message = f"{e.status_code} {getattr(e, 'message', '')}".strip()
        if e.status_code == 429 or e.status_code >= 500:  # Anthropic's 529: overloaded
            return Retryable(message, retry_after(e.response.headers))
        return RosettaError(f"{name}: {message}")
    if isinstance(e, sdk.APITimeoutError):
        return Retryable("timed out")
    if isinstance(e, sdk.APIConnectionError):
        return Retryable(f"could not connect ({e})")
    return Retryable(f"a malformed reply ({e})")


def to_parts(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[tuple[str, list]]]:
    """(the system prompt, [(role, [str | Image, ...]), ...]) of a conversation with OpenAI-style content parts;
    images decoded (a bad one is its InputError), scaled to MAX_SIDE and re-encoded; videos sampled to frames."""
    from rosetta.models.vlm import _with_image_placeholders

    plain, images = _with_image_placeholders(messages)
    pending = iter(images)
    system, turns = [], []
    for message in plain:
        content = message.get("content") or ""
        parts = [content] if isinstance(content, str) else [
            p["text"] if p["type"] == "text" else encode_image(next(pending)) for p in content]
        if message["role"] in ("system", "developer"):
            system.append(" ".join(p for p in parts if isinstance(p, str)))
        else:
            turns.append((message["role"], parts))
    if not turns:
        raise InputError("messages: no user message")
    return ("\n".join(system) or None), turns


def encode_image(image) -> Image:
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    photo = image.width * image.height > 512 * 512
    image.save(buffer, format="JPEG" if photo else "PNG", quality=90)
    return Image(buffer.getvalue(), "image/jpeg" if photo else "image/png")


def check_schema(schema: Mapping[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InputError(f"json schema: not a valid JSON Schema ({e.message})") from None


def validate(value: Any, schema: Mapping[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        raise ValueError(f"does not validate: {e.message}") from None


def _keyed(part) -> Any:
    return {"image": part.digest} if isinstance(part, Image) else part


def _key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _cache_dir(cache: bool | str | os.PathLike) -> Path | None:
    if cache is False:
        return None
    if cache is True:
        root = os.environ.get("ROSETTA_CACHE") or Path.home() / ".cache" / "rosetta"
        return Path(root) / "hosted"
    return Path(cache)


def _prices_from_env() -> dict[str, tuple[float, float]]:
    path = os.environ.get("ROSETTA_PRICES")
    if not path:
        return {}
    try:
        return {model: tuple(price) for model, price in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError, TypeError) as e:
        raise RosettaError(f"ROSETTA_PRICES={path}: not a JSON file of {{model: [input, output]}} ({e})") from None
