"""JSON-schema-constrained decoding through llguidance: at every step, only tokens that keep the output a
prefix of some JSON document valid against the schema may be chosen, so a finished output always parses
and validates, whatever the model's weights.

The output is compact JSON with one space after ',' and ':' (as `json.dumps` writes it): free whitespace
would let a model that has not learnt JSON pad forever.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from rosetta.errors import InputError

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(InputError):
    """A JSON Schema the constrained decoder cannot compile (the message says why)."""


class Grammars:
    """Compiles JSON schemas for one tokenizer. Building llguidance's view of a vocabulary takes about a
    second, so it is made once per model, on first use."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]):
        self._args = (tokenizer_json, vocab_size, list(eos_ids))
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                tokenizer_json, vocab_size, eos_ids = self._args
                self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_ids)
            return self._tokenizer

    def json_schema(self, schema: dict[str, Any] | str | bool) -> JsonConstraint:
        """A fresh constraint for one sequence; SchemaError when the schema does not compile."""
        import llguidance

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise SchemaError(f"json schema: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise SchemaError("json schema: must be a JSON object (or true/false)")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise SchemaError(f"json schema: {e}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise SchemaError(f"json schema: {' '.join(messages[0].split())}")
        return JsonConstraint(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self.tokenizer.vocab_size)


class JsonConstraint:
    """The grammar state of one sequence: which tokens may come next, advanced by each token chosen."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids now to -inf, in place."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bitmask[None], 0)
        if self.matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {self.matcher.get_error()}")
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((self._bitmask[:, None] >> bits) & 1).flatten().bool()[: logits.shape[-1]]
        if len(allowed) < logits.shape[-1]:  # tokens beyond the grammar's vocabulary are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - len(allowed))])
        logits.masked_fill_(~allowed.to(logits.device), -torch.inf)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} was refused ({self.matcher.get_error()})")

    @property
    def finished(self) -> bool:
        """The grammar allows nothing more: the document is complete (or end-of-sequence was consumed)."""
        return self.matcher.is_stopped()
