"""OpenAI's chat completions (GPT-4o, GPT-4.1...) through the `openai` SDK; OPENAI_API_KEY, OPENAI_BASE_URL."""

from __future__ import annotations

import os

from rosetta.hosted.base import HostedModel, Image, Reply, Retryable, sdk_failure


class OpenAIModel(HostedModel):
    vendor = "openai"
    key_variables = ("OPENAI_API_KEY",)

    def _client(self):
        import openai

        return openai.OpenAI(api_key=self.api_key, base_url=self.base_url or os.environ.get("OPENAI_BASE_URL"),
                             timeout=self.timeout, max_retries=0)  # our retries, with the cache between them

    def _send(self, system, turns, max_tokens, temperature, schema, seed) -> Reply:
        import openai

        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": role, "content": [_part(p) for p in parts]} for role, parts in turns]
        options = {"temperature": temperature, "seed": seed}
        if schema is not None:
            options["response_format"] = {"type": "json_schema", "json_schema": {"name": "fields", "schema": schema}}
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, max_completion_tokens=max_tokens,
                **{k: v for k, v in options.items() if v is not None})
        except openai.APIError as e:
            raise sdk_failure(self.name, e, openai, self.key_variables[0]) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a body the SDK could not parse
            raise Retryable(f"a malformed reply ({type(e).__name__})") from None
        try:
            text = response.choices[0].message.content
            usage = response.usage
            if not isinstance(text, str):
                raise TypeError("no text")
            return Reply(text, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
        except (AttributeError, IndexError, TypeError) as e:
            raise Retryable(f"a malformed reply ({e})") from None


def _part(part) -> dict:
    if isinstance(part, Image):
        return {"type": "image_url", "image_url": {"url": f"data:{part.media_type};base64,{part.base64}"}}
    return {"type": "text", "text": part}


MODEL_CLASS = OpenAIModel
