"""Anthropic's messages API (Claude) through the `anthropic` SDK; ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL.

Structured output is a forced tool call whose input schema is the schema: the tool's input is the answer."""

from __future__ import annotations

import json
import os

from rosetta.hosted.base import HostedModel, Image, Reply, Retryable, sdk_failure

TOOL = "record_fields"


class AnthropicModel(HostedModel):
    vendor = "anthropic"
    key_variables = ("ANTHROPIC_API_KEY",)

    def _client(self):
        import anthropic

        return anthropic.Anthropic(api_key=self.api_key,
                                   base_url=self.base_url or os.environ.get("ANTHROPIC_BASE_URL"),
                                   timeout=self.timeout, max_retries=0)

    def _send(self, system, turns, max_tokens, temperature, schema, seed) -> Reply:
        import anthropic

        options = {}
        if system:
            options["system"] = system
        if temperature is not None:  # the API takes it; the SDK's create() lost the keyword in 1.0 (its MIGRATION.md)
            options["extra_body"] = {"temperature": temperature}
        if schema is not None:
            options["tools"] = [{"name": TOOL, "description": "Record the fields read from the image.",
                                 "input_schema": schema}]
            options["tool_choice"] = {"type": "tool", "name": TOOL}
        messages = [{"role": role, "content": [_block(p) for p in parts]} for role, parts in turns]
        try:
            response = self.client.messages.create(model=self.model, max_tokens=max_tokens, messages=messages,
                                                   **options)
        except anthropic.APIError as e:
            raise sdk_failure(self.name, e, anthropic, self.key_variables[0]) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a body the SDK could not parse
            raise Retryable(f"a malformed reply ({type(e).__name__})") from None
        try:
            # With a schema the answer is the forced tool call's input; a reply in text instead is checked as it is.
            tool = next((b.input for b in response.content if b.type == "tool_use"), None) if schema else None
            text = json.dumps(tool) if tool is not None else "".join(
                b.text for b in response.content if b.type == "text")
            return Reply(text, response.usage.input_tokens, response.usage.output_tokens)
        except (AttributeError, TypeError) as e:
            raise Retryable(f"a malformed reply ({type(e).__name__})") from None


def _block(part) -> dict:
    if isinstance(part, Image):
        return {"type": "image", "source": {"type": "base64", "media_type": part.media_type, "data": part.base64}}
    return {"type": "text", "text": part}


MODEL_CLASS = AnthropicModel
