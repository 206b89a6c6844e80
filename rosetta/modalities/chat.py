"""Chat templates: a conversation rendered into the prompt text a chat model was trained on.

Templates are Jinja programs shipped with checkpoints (untrusted code), rendered in Jinja's immutable
sandbox with the environment transformers' `apply_chat_template` gives them: blocks trimmed, loop
controls, a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and the tokenizer's
special tokens as variables. The same conversation renders to the same text as it does there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rosetta.errors import InputError

ROLES = ("system", "user", "assistant", "tool", "developer")


class TemplateError(InputError):
    """A conversation the model's chat template refuses (its `raise_exception`), or a template that fails."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    class Namespace(jinja2.utils.Namespace):
        """A `namespace()` that refuses underscore names, which could otherwise reach Python's internals."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template: not valid Jinja ({e.message}, line {e.lineno})") from None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The conversation as plain dicts with a known role and text (or content parts); InputError otherwise.

    Keys whose value is None are dropped, as transformers does: OpenAI clients send `"content": null` beside
    tool calls, and templates handle a missing key but print "None".
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError("messages: a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}]: not an object with a role and content")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InputError(f"messages[{i}].content: expected a string or a list of content parts")
        out.append({key: value for key, value in message.items() if value is not None})
    return out


def render(template: str | Mapping[str, str], messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
           special_tokens: Mapping[str, str] | None = None, **variables: Any) -> str:
    """The prompt text of `messages` under `template` (or the right one of a named set: "tool_use" with tools)."""
    if isinstance(template, Mapping):
        name = "tool_use" if tools and "tool_use" in template else "default"
        if name not in template:
            raise TemplateError(f"chat template: none named {name!r} among {', '.join(template)}")
        template = template[name]
    import jinja2

    try:
        return compile_template(template).render(
            messages=check_messages(messages), tools=list(tools) if tools is not None else None, documents=None,
            add_generation_prompt=add_generation_prompt, **{**(special_tokens or {}), **variables},
        )
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template: {e}") from None
