"""Google's Gemini API through the `google-genai` SDK; GEMINI_API_KEY (or GOOGLE_API_KEY), GEMINI_BASE_URL."""

from __future__ import annotations

import os

from rosetta.errors import RosettaError
from rosetta.hosted.base import HostedModel, Image, Reply, Retryable
from rosetta.hosted.retry_after import retry_after


class GeminiModel(HostedModel):
    vendor = "gemini"
    key_variables = ("GEMINI_API_KEY", "GOOGLE_API_KEY")

    def _client(self):
        from google import genai
        from google.genai import types

        options = types.HttpOptions(timeout=int(self.timeout * 1000),  # milliseconds
                                    base_url=self.base_url or os.environ.get("GEMINI_BASE_URL"))
        return genai.Client(api_key=self.api_key, http_options=options)

    def _send(self, system, turns, max_tokens, temperature, schema, seed) -> Reply:
        from google.genai import errors, types

        contents = [types.Content(role="model" if role == "assistant" else "user", parts=[_part(p) for p in parts])
                    for role, parts in turns]
        config = types.GenerateContentConfig(system_instruction=system, max_output_tokens=max_tokens,
                                             temperature=temperature, seed=seed)
        if schema is not None:
            config.response_mime_type, config.response_json_schema = "application/json", schema
        try:
            response = self.client.models.generate_content(model=self.model, contents=contents, config=config)
        except errors.APIError as e:
            raise _failure(self.name, e) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a body the SDK could not parse
            raise Retryable(f"a malformed reply ({type(e).__name__})") from None
        except Exception as e:  # the SDK's HTTP client's own (httpx or its fork httpx2, by version)
            kinds = {c.__name__ for c in type(e).__mro__}
            if "TimeoutException" in kinds:
                raise Retryable("timed out") from None
            if "TransportError" in kinds:
                raise Retryable(f"could not connect ({e})") from None
            raise
        text, usage = response.text, response.usage_metadata
        if not isinstance(text, str):
            raise Retryable("a malformed reply (no text)")
        return Reply(text, (usage.prompt_token_count or 0) if usage else 0,
                     (usage.candidates_token_count or 0) if usage else 0)


def _part(part):
    from google.genai import types

    if isinstance(part, Image):
        return types.Part.from_bytes(data=part.data, mime_type=part.media_type)
    return types.Part.from_text(text=part)


def _failure(name: str, e) -> Exception:
    code = getattr(e, "code", None) or 0
    if code in (401, 403) or (code == 400 and "API key" in str(e)):
        return RosettaError(f"{name}: the API key was refused ({code}); check GEMINI_API_KEY")
    if code == 429 or code >= 500:
        response = getattr(e, "response", None)
        return Retryable(f"{code} {getattr(e, 'message', '')}".strip(), retry_after(getattr(response, "headers", None)))
    return RosettaError(f"{name}: {code} {getattr(e, 'message', '') or e}")


MODEL_CLASS = GeminiModel
