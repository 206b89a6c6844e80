"""Causal language models of the Llama family (Llama 3, SmolLM2, Qwen2.5, Mistral): the config, the model,
and the tasks on it — `generate`, `chat`, `stream`.

    tokens ─▶ embed ─▶ [RMSNorm ─▶ GQA attention (RoPE, KV cache) ─▶ + ─▶ RMSNorm ─▶ SwiGLU ─▶ +] × layers
           ─▶ RMSNorm ─▶ lm_head (often the embedding, tied) ─▶ logits

The members of the family differ only in settings: q/k/v biases (Qwen2), rotary scaling (Llama 3),
a sliding attention window (Mistral), tied embeddings (the small ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from rosetta.errors import InputError, RosettaError
from rosetta.generation.sampling import SamplingParams
from rosetta.modalities.text import LMTokenizer, byte_lm_tokenizer
from rosetta.models.registry import Family
from rosetta.nn.cache import CacheWindow, KVCache, attention_mask
from rosetta.nn.decoder import DecoderBlock, RMSNorm, RopeScaling, RotaryEmbedding
from rosetta.nn.linear import Linear, fast_linear

ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 49152
    width: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int | None = None  # None: width // heads
    mlp_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    context_length: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    architecture: str = "llama"  # the transformers class it is exported as: llama, qwen2 or mistral
    sampling: SamplingParams = field(default_factory=SamplingParams)  # the checkpoint's default decoding

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r} (expected one of {', '.join(ARCHITECTURES)})")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.width // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMConfig:
        d = dict(d)
        scaling = d.pop("rope_scaling", None)
        return cls(
            rope_scaling=RopeScaling(**scaling) if scaling else None,
            sampling=SamplingParams(**d.pop("sampling", {})),
            eos_token_ids=tuple(d.pop("eos_token_ids", ())),
            **d,
        )


_SMOLLM2 = dict(rope_theta=100000.0, context_length=8192, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                pad_token_id=2)

PRESETS: dict[str, LMConfig] = {
    "smollm2-135m": LMConfig(vocab_size=49152, width=576, layers=30, heads=9, kv_heads=3, mlp_dim=1536, **_SMOLLM2),
    "smollm2-360m": LMConfig(vocab_size=49152, width=960, layers=32, heads=15, kv_heads=5, mlp_dim=2560, **_SMOLLM2),
    "qwen2.5-0.5b": LMConfig(
        vocab_size=151936, width=896, layers=24, heads=14, kv_heads=2, mlp_dim=4864, norm_eps=1e-6,
        rope_theta=1000000.0, context_length=32768, tie_embeddings=True, qkv_bias=True, bos_token_id=151643,
        eos_token_ids=(151645, 151643), pad_token_id=151643, architecture="qwen2",
        sampling=SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    ),
    "llama-3.2-1b": LMConfig(
        vocab_size=128256, width=2048, layers=16, heads=32, kv_heads=8, head_dim=64, mlp_dim=8192,
        rope_theta=500000.0, context_length=131072, tie_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_context=8192),
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
        sampling=SamplingParams(temperature=0.6, top_p=0.9),
    ),
    # Small enough to build, train and test in a second; its byte-level tokenizer's ids fit the vocabulary.
    "tiny-lm": LMConfig(vocab_size=260, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128, context_length=512,
                        tie_embeddings=False, bos_token_id=257, eos_token_ids=(258,), pad_token_id=256),
}

# The checkpoint each preset loads when pretrained weights are asked for: the instruction-tuned ones, which chat.
PRETRAINED: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
}


class CausalLM(nn.Module):
    def __init__(self, config: LMConfig, tokenizer: LMTokenizer | None = None):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.blocks = nn.ModuleList(
            DecoderBlock(c.width, c.heads, c.kv_heads, c.head_size, c.mlp_dim, c.norm_eps, c.qkv_bias, c.out_bias,
                         c.mlp_bias)
            for _ in range(c.layers)
        )
        self.norm = RMSNorm(c.width, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else Linear(c.width, c.vocab_size, bias=False)
        self.int8_head = None  # the tied projection, when the model is quantised (rosetta.nn.quantize)
        self.rope = RotaryEmbedding(c.head_size, c.rope_theta, c.rope_scaling)
        self.tokenizer = tokenizer or byte_lm_tokenizer()
        self._grammars = None
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal weights of std 0.02 and zero biases, as Llama initialises."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def context_length(self) -> int:
        return self.config.context_length

    # Tensors in, logits out: what training, parity tests and the generation engine use.

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def forward(self, ids: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, window: CacheWindow | None = None,
                attention_mask: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
        """Logits [B, L, V] of token ids [B, L] or input embeddings [B, L, D] (of the `last` positions only, when
        given: the next-token logits of a generation step, without projecting the rest).

        Without a cache window the whole sequence is attended causally; `attention_mask` [B, L] (1 for real
        tokens, 0 for left padding) masks padding and sets the positions, as in transformers.
        """
        x = self.embed(ids) if embeds is None else embeds.to(self.dtype)
        if window is None:
            window, default_positions = self._uncached(x.shape[0], x.shape[1], attention_mask)
            positions = default_positions if positions is None else positions
        elif positions is None:
            raise ValueError("a cached pass needs the positions of its tokens")
        rope = self.rope(positions, x.dtype)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if checkpointed:  # activations recomputed in backward: memory for compute, as in training
                x = torch.utils.checkpoint.checkpoint(block, x, rope, window, layer, use_reentrant=False)
            else:
                x = block(x, rope, window, layer)
        if last is not None:
            x = x[:, -last:]
        x = self.norm(x)
        if self.int8_head is not None:
            return self.int8_head(x)
        return fast_linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    def tied_output_weight(self) -> torch.Tensor | None:
        """The embedding, when the logits reuse it (for int8 quantisation, which needs its own copy)."""
        return self.embed.weight if self.lm_head is None else None

    def _uncached(self, batch: int, length: int, attention_mask: torch.Tensor | None):
        device = self.device
        if attention_mask is None:
            sliding = self.config.sliding_window
            mask = None
            if sliding is not None and length > sliding:
                mask = attention_mask_for(torch.zeros(batch, dtype=torch.long, device=device), length, sliding)
            return CacheWindow.uncached(mask), torch.arange(length, device=device).expand(batch, length)
        attention_mask = attention_mask.to(device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        first = length - attention_mask.long().sum(-1)  # left padding: real tokens start here
        return CacheWindow.uncached(attention_mask_for(first, length, self.config.sliding_window)), positions

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.layers, c.kv_heads, c.head_size, slots, capacity, self.dtype, self.device,
                       c.sliding_window)

    # Text in, text out.

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 256, **options: Any) -> str | list[str]:
        """The completion of a prompt (a list of completions for a list of prompts).

        Options: temperature (0: greedy), top_k, top_p, min_p, repetition_penalty (default: the checkpoint's
        generation config, else greedy), stop (strings), json_schema (a dict or JSON text: the output then
        always validates), seed, num_beams and length_penalty (beam search), ignore_eos, truncate (cut a
        prompt longer than the context from the left instead of refusing it), logits_processors, compile (decode
        steps through torch.compile: a minute's compilation on first use, faster tokens after it).
        """
        from rosetta.generation.tasks import complete

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        completions = complete(self, [self.tokenizer.encode(p) for p in prompts], max_new_tokens, **options)
        texts = [c.text for c in completions]
        return texts[0] if isinstance(prompt, str) else texts

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, **options: Any) -> str:
        """The assistant's reply to a conversation [{"role": ..., "content": ...}], through the chat template."""
        from rosetta.generation.tasks import complete

        return complete(self, [self.chat_prompt(messages)], max_new_tokens, **options)[0].text

    def stream(self, prompt: str | Sequence[Mapping[str, Any]], max_new_tokens: int = 256,
               **options: Any) -> Iterator[str]:
        """Text deltas of the completion of a prompt, or of the reply to a conversation, as they are made."""
        from rosetta.generation.tasks import stream

        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.chat_prompt(prompt)
        return stream(self, ids, max_new_tokens, **options)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The token ids of a conversation rendered with the checkpoint's chat template."""
        from rosetta.modalities.chat import render

        template = self.tokenizer.chat_template
        if template is None:
            raise InputError("this model has no chat template (a base model?): use generate() with a plain prompt")
        text = render(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                      special_tokens=self.tokenizer.special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def grammars(self):
        """The JSON-schema compiler for this model's vocabulary (built on first use)."""
        if self._grammars is None:
            from rosetta.generation.constraints import Grammars

            self._grammars = Grammars(self.tokenizer.backend.to_str(), self.config.vocab_size, self.stop_ids())
        return self._grammars

    def stop_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: the config's, and the tokenizer's end-of-sequence token (if the model can say it)."""
        ids = list(self.config.eos_token_ids)
        if self.tokenizer.eos_id is not None and self.tokenizer.eos_id not in ids:
            ids.append(self.tokenizer.eos_id)
        return tuple(i for i in ids if 0 <= i < self.config.vocab_size)

    def save_pretrained(self, directory: str | Path, format: str = "rosetta") -> Path:
        """Write a model directory: Rosetta's own format, or `format="transformers"` for transformers."""
        from rosetta.models.registry import save

        return save(self, Path(directory), format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_params() / 1e6:.1f}M, architecture={self.config.architecture}"


def attention_mask_for(first: torch.Tensor, length: int, sliding_window: int | None) -> torch.Tensor:
    """The mask [B, 1, L, L] of a whole-sequence pass whose rows' real tokens start at `first` [B]."""
    columns = torch.arange(length, device=first.device)
    return attention_mask(first, columns, columns, sliding_window)


def read_tokenizer(directory: Path, config: LMConfig) -> LMTokenizer:
    tokenizer = LMTokenizer.from_directory(directory)
    if tokenizer is None:
        raise RosettaError(f"{directory}: no tokenizer.json (Rosetta reads the tokenizers library's format, which "
                           "transformers' fast tokenizers save)")
    return tokenizer


FAMILY = Family(
    name="lm", config_class=LMConfig, model_class=CausalLM, presets=PRESETS, pretrained=PRETRAINED,
    converters=("llama",), read_tokenizer=read_tokenizer,
)
